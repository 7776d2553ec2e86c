"""InCTRL / InCTRLv2 inference speed for K = 1, 2, 4 support images, the cost of the patch NN search, and
the speed-up over an official-style inference loop.

    python benchmarks/bench_inctrl.py [--setups tiny b16plus] [--shots 1 2 4] [--batch-sizes 1 16]
                                      [--repeats 3] [--reference-images 2] [--device auto] [--out PATH]

Random weights (no downloads), random uint8 images at the model size (240; test-tiny also at 240, so
its patch grid is the paper's 15 x 15). Per method, setup, K and batch size: `predict` images/s with
the support features cached (the method's normal path, preprocessing included), after a warm-up call.

Breakdown at the largest K and batch: seconds of the frozen backbone forward of the batch
(`InCTRL.encode`) vs the patch nearest-neighbour search (Eq. 3 over all layers and support patches,
`patch_residual_maps`), and the search's memory: the support memory tensor plus the largest
similarity block (analytic from the shapes on CPU; the CUDA allocator's peak on GPU).

Reference: the official InCTRL inference loop written straightforwardly (batch 1, fp32, nothing
cached: support images and the prompt ensemble are encoded again for every query, and the nearest
support patch is searched one query patch at a time as in the official code), checked to give the same
scores; the figure is ours (largest batch, largest K) / reference images per second.

Prints a markdown table and writes JSON (default benchmarks/results/inctrl.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import anomalens as al
from anomalens.methods.base import resolve_device
from anomalens.methods.inctrl import (
    InCTRL,
    holistic_score,
    image_residual,
    patch_residual_maps,
    prototype,
)
from anomalens.ops import anchor_probability
from anomalens.prompts import ensemble_text_features

DEFAULT_OUT = Path(__file__).parent / "results" / "inctrl.json"
SETUPS = {
    "tiny": {"backbone": "test-tiny", "image_size": 240},
    "b16plus": {"backbone": "ViT-B-16-plus-240", "image_size": 240},
}
CLASS_NAME = "bottle"


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


@torch.no_grad()
def reference_score(model: InCTRL, image: torch.Tensor, support: torch.Tensor) -> float:
    """One query through the official loop's structure: no caching, per-patch NN search (v1 score)."""
    cls, tokens = model.encode(image[None])  # (1, E), (1, L, N, D)
    support_cls, support_tokens = model.encode(support)  # (K, E), (K, L, N, D)
    residual_maps = []
    for layer in range(tokens.shape[1]):
        memory = F.normalize(support_tokens[:, layer].flatten(0, 1), dim=-1)  # (K·N, D)
        per_patch = []
        for patch in tokens[0, layer]:
            q = F.normalize(patch[None], dim=-1)  # (1, D)
            per_patch.append((0.5 * (1 - q @ memory.T)).min(dim=1).values)
        residual_maps.append(torch.cat(per_patch))
    residual_map = torch.stack(residual_maps).mean(dim=0)[None]  # (1, N)
    proto = prototype(model.adapter(support_cls)[None])  # (1, E)
    s_i = model.ref_head(image_residual(model.adapter(cls), proto, model.official_compat))

    def encode(prompts: list[str]) -> torch.Tensor:
        return model.backbone.encode_text(model.backbone.tokenize(prompts))

    normal, anomalous = model.prompts(CLASS_NAME)
    anchors = torch.stack([ensemble_text_features(encode, normal), ensemble_text_features(encode, anomalous)])
    s_t = anchor_probability(F.normalize(cls, dim=-1), anchors[None], model.config.text_scale)
    return float(holistic_score(s_t, s_i, residual_map, model.holistic_head)[0])


def search_memory(model: al.methods.Method, batch: int, shots: int) -> dict[str, float]:
    """MiB of the support memory tensor and of the largest similarity block of the NN search."""
    n_layers, n = len(model.layers), model.n_patches
    rows = max(1, model.nn_chunk_elements() // (n_layers * shots * n))  # query rows per block (ops._nearest)
    block = n_layers * min(rows, batch * n) * shots * n * 4
    memory = n_layers * shots * n * model.backbone.width * 4
    return {"support_memory_mib": memory / 2**20, "similarity_block_mib": block / 2**20}


def throughput(
    model: al.methods.Method,
    images: np.ndarray,
    supports: dict[int, np.ndarray],
    batches: list[int],
    repeats: int,
    device: torch.device,
) -> list[dict]:
    """`predict` images/s per K and batch size, with the support features cached after the warm-up."""
    rows = []
    for k, support in supports.items():
        for bs in batches:
            batch = images[:bs]

            def call(b: np.ndarray = batch, s: np.ndarray = support, n: int = bs) -> object:
                return model.predict(b, CLASS_NAME, support=s, batch_size=n)

            seconds = median_seconds(call, repeats, device)
            rows.append({"method": model.name, "shots": k, "batch": bs, "images_per_s": bs / seconds})
    return rows


def breakdown(
    model: InCTRL, images: np.ndarray, support: np.ndarray, repeats: int, device: torch.device
) -> dict[str, float]:
    """Backbone forward vs patch NN search seconds for one batch, and the search's memory."""
    x = model.backbone.preprocess(list(images), resize=model.resize)
    ctx = model.prepare_support(model.backbone.preprocess(list(support), resize=model.resize))
    queries = F.normalize(model.encode(x)[1], dim=-1)
    chunk = model.nn_chunk_elements()
    encode_s = median_seconds(lambda: model.encode(x), repeats, device)
    search_s = median_seconds(lambda: patch_residual_maps(queries, ctx.tokens, 0.5, chunk), repeats, device)
    out = {
        "shots": len(support),
        "batch": len(images),
        "backbone_forward_s": encode_s,
        "patch_nn_search_s": search_s,
        "search_over_forward": search_s / encode_s,
        **search_memory(model, len(images), len(support)),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        patch_residual_maps(queries, ctx.tokens, 0.5, chunk)
        out["cuda_peak_search_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out


def reference(model: InCTRL, images: np.ndarray, support: np.ndarray, fastest: float) -> dict[str, float]:
    """The official-style loop on `images`: images/s, agreement with `predict`, and our speed-up."""
    ours = model.predict(images, CLASS_NAME, support=support).scores
    x = model.backbone.preprocess(list(images), resize=model.resize)
    s = model.backbone.preprocess(list(support), resize=model.resize)
    start = time.perf_counter()
    scores = [reference_score(model, x[i], s) for i in range(len(images))]
    seconds = (time.perf_counter() - start) / len(images)
    return {
        "shots": len(support),
        "images": len(images),
        "images_per_s": 1 / seconds,
        "max_abs_score_diff": float(np.abs(np.array(scores) - ours).max()),
        "speedup": fastest * seconds,
    }


def run_setup(
    name: str, shots: list[int], batches: list[int], repeats: int, n_reference: int, device: torch.device
) -> dict:
    setup = SETUPS[name]
    size = setup["image_size"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(batches), size, size, 3), dtype=np.uint8)
    supports = {k: rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8) for k in shots}
    result: dict = {"backbone": setup["backbone"], "image_size": size, "rows": []}
    for method_name in ("inctrl", "inctrlv2"):
        torch.manual_seed(0)
        model = al.create(
            method_name, backbone=setup["backbone"], pretrained=None, device=str(device), image_size=size
        )
        rows = throughput(model, images, supports, batches, repeats, device)
        result["rows"] += rows
        if method_name == "inctrl":
            k = max(shots)
            result["breakdown"] = breakdown(model, images, supports[k], repeats, device)
            fastest = max(r["images_per_s"] for r in rows if r["shots"] == k)
            result["reference"] = reference(model, images[:n_reference], supports[k], fastest)
    return result


def markdown(results: dict) -> str:
    lines = []
    for name, setup in results["setups"].items():
        lines.append(f"\n**{name}** ({setup['backbone']} @ {setup['image_size']}, random weights)\n")
        lines.append("| method | K | batch | images/s |\n| --- | ---: | ---: | ---: |")
        lines += [
            f"| {r['method']} | {r['shots']} | {r['batch']} | {r['images_per_s']:.2f} |"
            for r in setup["rows"]
        ]
        b, ref = setup["breakdown"], setup["reference"]
        lines.append(
            f"\nK={b['shots']}, batch {b['batch']}: backbone forward {b['backbone_forward_s'] * 1e3:.1f} ms, "
            f"patch NN search {b['patch_nn_search_s'] * 1e3:.2f} ms ({b['search_over_forward']:.1%} of the "
            f"forward); search memory: support {b['support_memory_mib']:.2f} MiB + similarity block "
            f"{b['similarity_block_mib']:.2f} MiB"
            + (f", CUDA peak {b['cuda_peak_search_mib']:.1f} MiB" if "cuda_peak_search_mib" in b else "")
            + f".\nOfficial-style loop (batch 1, no caching): {ref['images_per_s']:.3f} images/s; ours "
            f"{ref['speedup']:.1f}x faster (max |score diff| {ref['max_abs_score_diff']:.1e})."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-images", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = {
        "benchmark": "inctrl",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "repeats": args.repeats,
        "setups": {
            name: run_setup(name, args.shots, args.batch_sizes, args.repeats, args.reference_images, device)
            for name in args.setups
        },
    }
    print(markdown(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
