"""CoRe-CLIP: inference speed of three-branch vs single-branch mode, and the paper's central ablations.

    python benchmarks/bench_core_clip.py speed [--backbones test-tiny ViT-L-14] [--batch 8] [--out PATH]
    python benchmarks/bench_core_clip.py ablation [--seeds 0 1 2] [--out PATH]

``speed``: images/s of `predict` (batched, no gradients, random weights) with ``branches=("s","c","g")``
and ``branches=("g",)`` on each backbone at its native size; the figure is the ratio.

``ablation``: N-shot training on `test-tiny` (random weights) and image AUROC on unseen subject-context
pairs for the full model, the global branch alone in place of the CRM fusion (Table 5, first row) and
normal-only training (C.1), on two contextual sets:

* "habitats" (`write_habitat_dataset`, the data we control): each subject belongs to one habitat, a
  colour family of the background; training shows habitats as stripes (SS), the test shows them as
  checkers (CC, unseen subject-context combinations). The rule is visible in the pixels, so the
  compatibility of an unseen pair can be inferred from the seen ones.
* `synthetic:contextual` (SS and CC test parts): CC shows the same subject-context rule with the
  contexts rendered in an unseen look ("mosaic"), so CC pairs are unseen combinations whose
  compatibility follows the rule learned on SS (see docs/methods/core-clip.md).

Both print a markdown table and write JSON (default benchmarks/results/core_clip_<command>.json).
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
from PIL import Image

import anomalens as al
from anomalens.data import Dataset, balanced_subset, normal_only
from anomalens.data.contextual import write_manifest

RESULTS = Path(__file__).parent / "results"

# ---------------------------------------------------------------------------------- habitat dataset
# Habitat -> background base colour; subject -> (its habitat, its colour). No background colour is normal
# or anomalous by itself: each is normal for one subject and anomalous for the others.
HABITATS = {"red": (190, 70, 60), "green": (70, 160, 70), "blue": (60, 90, 190)}
SUBJECTS = {
    "disc": ("red", (235, 235, 225)),
    "square": ("green", (240, 210, 60)),
    "cross": ("blue", (30, 30, 35)),
}
TEXTURES = {"SS": "stripes", "CC": "checker"}
PARTS = (("train", "SS"), ("test", "SS"), ("test", "CC"))


def _backgrounds(habitats: list[str], texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, S, S, 3) float backgrounds: habitat colour ± a stripe or checker texture and pixel noise."""
    n = len(habitats)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle, phase = rng.uniform(0, np.pi, (n, 1, 1)), rng.uniform(0, 2 * np.pi, (n, 1, 1))
    freq = rng.uniform(4, 7, (n, 1, 1))
    if texture == "stripes":
        t = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    else:
        t = np.sign(np.sin(2 * np.pi * freq * xx + phase) * np.sin(2 * np.pi * freq * yy + phase))
    base = np.array([HABITATS[h] for h in habitats], dtype=np.float64)[:, None, None] + rng.uniform(
        -15, 15, (n, 1, 1, 3)
    )
    return base + 35 * t[..., None] + rng.normal(0, 6, (n, size, size, 3))


def _subject_masks(shape: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, S, S) bool: a disc, square or cross at a random position and scale."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy = (rng.uniform(0.35, 0.65, (n, 1, 1)) * size for _ in range(2))
    r = rng.uniform(0.18, 0.26, (n, 1, 1)) * size
    u, v = (xx - cx) / r, (yy - cy) / r
    if shape == "disc":
        return u**2 + v**2 <= 1
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    return ((np.abs(u) <= 1) & (np.abs(v) <= 0.3)) | ((np.abs(v) <= 1) & (np.abs(u) <= 0.3))


def write_habitat_dataset(root: str | Path, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write a `contextual:<root>` dataset whose compatibility rule is visible: subject vs habitat colour.

    Per subject and part (SS train, SS test, CC test): n normal images (its own habitat) and n anomalous
    ones (the other habitats, alternating). SS backgrounds are stripes, CC backgrounds checkers, so every
    CC subject-context pair is unseen in training. Anomalous images' masks are the subject masks.
    """
    root = Path(root)
    rows = []
    for si, (subject, (habitat, colour)) in enumerate(SUBJECTS.items()):
        for pi, (set_name, part) in enumerate(PARTS):
            for label in (0, 1):
                rng = np.random.default_rng([seed, si, pi, label])
                choices = [habitat] if label == 0 else [h for h in HABITATS if h != habitat]
                contexts = [choices[i % len(choices)] for i in range(n)]
                masks = _subject_masks(subject, n, size, rng)
                paint = np.array(colour) + rng.uniform(-10, 10, (n, 1, 1, 3))
                images = np.where(masks[..., None], paint, _backgrounds(contexts, TEXTURES[part], size, rng))
                images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
                for i in range(n):
                    stem = f"{set_name}-{part}/{subject}-{'anomalous' if label else 'normal'}-{i:03d}.png"
                    for folder, array in (
                        ("images", images[i]),
                        ("subject_masks", masks[i].astype(np.uint8) * 255),
                    ):
                        (root / folder / stem).parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(array).save(root / folder / stem)
                    rows.append(
                        {
                            "image": f"images/{stem}",
                            "subject_mask": f"subject_masks/{stem}",
                            "class": subject,
                            "context": f"{contexts[i]} {TEXTURES[part]}",
                            "label": label,
                            "split": part,
                            "set": set_name,
                        }
                    )
    write_manifest(root, rows)
    return root


# ---------------------------------------------------------------------------------- evaluation
def part(dataset: Dataset, name: str) -> Dataset:
    """The records of one contextual part ("SS" or "CC") of a dataset."""
    return dataset.subset([i for i, r in enumerate(dataset.records) if dict(r.meta)["split"] == name])


def class_mean_auroc(method: al.methods.Method, dataset: Dataset) -> float:
    """Image AUROC per class (the paper's Table 13), averaged over classes."""
    samples = list(dataset)
    pred = method.predict(np.stack([s.image for s in samples]), class_names=[s.class_name for s in samples])
    labels = dataset.labels
    names = np.array([s.class_name for s in samples])
    return float(
        np.mean(
            [al.metrics.image_auroc(labels[names == c], pred.scores[names == c]) for c in dataset.class_names]
        )
    )


# Variants of the ablation: method options and the training subset.
VARIANTS = {
    "full (s+c+g, CRM)": ({}, "balanced"),
    "full, Eq. 25 on ×100 logits": ({"fuse_cons_space": "logits"}, "balanced"),
    "global branch only": ({"branches": ("g",)}, "balanced"),
    "normal-only training": ({}, "normal"),
}
# Training settings for a random-weight tiny backbone (Table 7's rates assume pretrained ViT-L features).
TRAINING = {"text.lr": 1e-3, "image.lr": 1e-2, "image.epochs": 30}
IMAGE_SIZE = 64


def run_variant(
    options: dict, subset: str, train: Dataset, tests: dict[str, Dataset], shots: int, seed: int
) -> dict[str, float]:
    """Train one variant from scratch on an N-shot subset; class-mean image AUROC before and after."""
    torch.manual_seed(seed)
    method = al.create(
        "core-clip", backbone="test-tiny", pretrained=None, device="cpu", image_size=IMAGE_SIZE, **options
    )
    data = balanced_subset(train, shots, seed=seed)
    if subset == "normal":
        data = normal_only(data)
    before = {k: class_mean_auroc(method, d) for k, d in tests.items()}
    method.fit(data, seed=seed, progress=False, **TRAINING)
    return {
        **{f"{k} untrained": v for k, v in before.items()},
        **{k: class_mean_auroc(method, d) for k, d in tests.items()},
    }


def ablation(seeds: list[int], shots: list[int], workdir: Path) -> dict:
    """{set: {"<N>-shot": {variant: {metric: {"mean", "std"}}}}} over `seeds` (data draw and init)."""
    habitat_root = workdir / "habitats"
    if not (habitat_root / "manifest.csv").is_file():
        write_habitat_dataset(habitat_root, n=16, size=IMAGE_SIZE)
    habitat_test = al.data.load(f"contextual:{habitat_root}", split="test")
    synthetic = "synthetic:contextual?size=64&n=16"
    synthetic_test = al.data.load(synthetic, split="test")
    sets = {
        "habitats": (
            al.data.load(f"contextual:{habitat_root}", split="train"),
            {"CC": part(habitat_test, "CC")},
        ),
        "synthetic:contextual": (
            al.data.load(synthetic, split="train"),
            {"SS": part(synthetic_test, "SS"), "CC": part(synthetic_test, "CC")},
        ),
    }
    results: dict = {}
    for set_name, (train, tests) in sets.items():
        for n in shots:
            for variant, (options, subset) in VARIANTS.items():
                runs = [run_variant(options, subset, train, tests, n, seed) for seed in seeds]
                summary = {
                    k: {
                        "mean": statistics.mean(r[k] for r in runs),
                        "std": statistics.pstdev(r[k] for r in runs),
                    }
                    for k in runs[0]
                }
                results.setdefault(set_name, {}).setdefault(f"{n}-shot", {})[variant] = summary
                print(set_name, n, variant, {k: round(v["mean"], 3) for k, v in summary.items()}, flush=True)
    return results


def ablation_table(results: dict) -> str:
    """Markdown: one row per set, shots and variant; columns = class-mean image AUROC per test part."""
    lines = ["| set | shots | variant | " + " | ".join(_columns(results)) + " |"]
    lines.append("|" + " --- |" * (3 + len(_columns(results))))
    for set_name, by_shots in results.items():
        for shots, variants in by_shots.items():
            for variant, metrics in variants.items():
                cells = [
                    f"{metrics[c]['mean']:.3f} ± {metrics[c]['std']:.3f}" if c in metrics else "–"
                    for c in _columns(results)
                ]
                lines.append(f"| {set_name} | {shots} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _columns(results: dict) -> list[str]:
    names = {k for by_shots in results.values() for v in by_shots.values() for m in v.values() for k in m}
    return sorted(names, key=lambda k: (k.split()[0] != "SS", "untrained" not in k, k))


# ---------------------------------------------------------------------------------- speed
def images_per_second(backbone: str, branches: tuple[str, ...], batch: int, repeats: int) -> float:
    """Best-of-`repeats` images/s of `predict` on random images (one warm-up call first)."""
    torch.manual_seed(0)
    method = al.create("core-clip", backbone=backbone, pretrained=None, device="auto", branches=branches)
    size = method.backbone.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    method.predict(images, class_names="object", batch_size=batch)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        method.predict(images, class_names="object", batch_size=batch)
        best = min(best, time.perf_counter() - start)
    return batch / best


def speed_table(results: dict) -> str:
    lines = ["| backbone | 3-branch img/s | single-branch img/s | ratio |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        row = (
            f"| {name} | {r['three_branch_img_s']:.2f} | {r['single_branch_img_s']:.2f} | {r['ratio']:.2f} |"
        )
        lines.append(row)
    return "\n".join(lines)


def speed(backbones: list[str], batch: int, repeats: int) -> dict:
    results = {}
    for name in backbones:
        three = images_per_second(name, ("s", "c", "g"), batch, repeats)
        one = images_per_second(name, ("g",), batch, repeats)
        results[name] = {"three_branch_img_s": three, "single_branch_img_s": one, "ratio": one / three}
        print(name, {k: round(v, 3) for k, v in results[name].items()}, flush=True)
    return results


def machine() -> dict:
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("speed", "ablation"))
    parser.add_argument("--backbones", nargs="+", default=["test-tiny", "ViT-L-14"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "core_clip_data")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.command == "speed":
        body = {"batch": args.batch, "backbones": speed(args.backbones, args.batch, args.repeats)}
        table = speed_table(body["backbones"])
    else:
        sets = ablation(args.seeds, args.shots, args.workdir)
        body = {"shots": args.shots, "seeds": args.seeds, "training": TRAINING, "sets": sets}
        table = ablation_table(sets)
    doc = {
        "benchmark": f"core_clip_{args.command}",
        "machine": machine(),
        "seconds": time.perf_counter() - start,
        **body,
    }
    out = args.out or RESULTS / f"core_clip_{args.command}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
