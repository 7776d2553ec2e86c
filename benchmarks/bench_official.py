"""Side by side: our `predict` against the official inference code, fp32 on the CPU, identical random
weights and inputs (needs the official checkouts at ``$ANOMALENS_OFFICIAL``).

The official models are built and run by the same glue as the parity tests (``tests/official_code.py``,
put on ``sys.path`` here): their own classes, our random weights, their ``test.py`` inference path. Per
method, after one untimed call of each side, the two sides are called alternately (ours first in even
rounds, theirs first in odd ones) ``--repeats`` times on the same images; the figure is the median over
rounds of official time ÷ our time (> 1: ours is faster), and the outputs of both sides are compared
(max |Δ|). What each side's time covers:

* ours: ``Method.predict`` on uint8 images already at the model's size (normalisation, forward, maps
  back to the image size, smoothing), batch ``--batch``; text anchors and support features are cached
  across calls as in any use of a method object;
* official: its per-image test path on the same normalised tensor (its data-loader preprocessing is not
  timed); what its test.py computes once per class (AA-CLIP's and Crane's text features, AnomalyDINO's
  memory bank) is computed once here too, what it recomputes per query (InCTRL: the 242-prompt text
  ensemble and the support features) is timed.

Rows: ``crane`` (the "Crane" configuration: E-Attn, taps 6/12/18/24 mapped to the backbone's depth, no
DINO, ``official_compat``), ``aa-clip`` (the official AdaptedCLIP hard-codes ViT-L-14-336),
``inctrl`` (the official model in a worker process: its tree ships its own ``open_clip``; the default
size is the small ViT of ``tests/test_parity_inctrl_steps.py``, ``--official-sizes`` ViT-B-16-plus-240
at 240), ``adaclip`` (batch 1, the only one its code runs), ``anomalydino`` (DINOv2 ViT-S/14, one
support image and its 8 rotations), ``musc`` (the scoring stage only, LNAMD + MSM from given patch
tokens: the official MuSc runs its own modified open_clip, which the parity tests do not load).

    ANOMALENS_OFFICIAL=/work/official OMP_NUM_THREADS=1 PYTHONPATH=src \\
        python benchmarks/bench_official.py [--methods crane,aa-clip,inctrl] [--official-sizes]

Default sizes run in a few minutes on a 2-core CPU: Crane and AdaCLIP on ViT-B-16 at 224, AA-CLIP on
ViT-L-14-336 at 112, AnomalyDINO at 224. ``--official-sizes``: the papers' (Crane and AA-CLIP ViT-L-14-336
at 518, AdaCLIP ViT-L-14-336 at 518, AnomalyDINO 448, InCTRL ViT-B-16-plus-240); minutes per call on
such a CPU. ``--backbone`` / ``--image-size`` override Crane's and AdaCLIP's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import anomalens as al  # noqa: E402
import official_code  # noqa: E402  (tests/official_code.py)

METHODS = ("crane", "aa-clip", "inctrl", "adaclip", "anomalydino", "musc")
NEEDS = {"anomalydino": ("anomalydino", "dinov2")}


@dataclass
class Pair:
    """Both sides of one row: each call returns the compared outputs, one flat array."""

    setup: str
    ours: Callable[[], np.ndarray]
    theirs: Callable[[], np.ndarray]
    compared: str
    close: Callable[[], None] = lambda: None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    parser.add_argument("--official-sizes", action="store_true", help="the papers' backbones and sizes")
    parser.add_argument("--backbone", help="Crane's and AdaCLIP's backbone (default ViT-B-16)")
    parser.add_argument("--image-size", type=int, help="Crane's and AdaCLIP's input size")
    parser.add_argument("--batch", type=int, default=1, help="images per call (AdaCLIP: always 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each side")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    rows = []
    for method in methods:
        if not official_code.available(*NEEDS.get(method, (method,))):
            print(f"{method}: official code not under {official_code.OFFICIAL}, skipped")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(method, args, Path(tmp)))
    print()
    print("| method | setup | ours s/call | official s/call | official ÷ ours | compared | max abs Δ |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        print(
            f"| {r['method']} | {r['setup']} | {r['ours_s']:.3g} | {r['official_s']:.3g} | "
            f"{r['ratio']:.2f}x | {r['compared']} | {r['max_abs_diff']:.1e} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def run(method: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Build both sides of `method`, check their outputs agree, time them alternately."""
    builders = {
        "crane": crane,
        "aa-clip": aa_clip,
        "inctrl": inctrl,
        "adaclip": adaclip,
        "anomalydino": anomalydino,
        "musc": musc,
    }
    pair = builders[method](args, tmp)
    try:
        diff = float(np.abs(pair.ours() - pair.theirs()).max())  # also the untimed warm-up calls
        ours, theirs = [], []
        for r in range(args.repeats):
            for side in (0, 1) if r % 2 == 0 else (1, 0):
                fn, times = (pair.ours, ours) if side == 0 else (pair.theirs, theirs)
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    finally:
        pair.close()
    row = {
        "method": method,
        "setup": pair.setup,
        "ours_s": statistics.median(ours),
        "official_s": statistics.median(theirs),
        "ratio": statistics.median(t / o for t, o in zip(theirs, ours, strict=True)),
        "compared": pair.compared,
        "max_abs_diff": diff,
        "ours_all_s": ours,
        "official_all_s": theirs,
    }
    print(json.dumps(row))
    return row


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _clip_setup(args: argparse.Namespace) -> tuple[str, int]:
    """(backbone, image size) of Crane and AdaCLIP."""
    default = ("ViT-L-14-336", 518) if args.official_sizes else ("ViT-B-16", 224)
    return args.backbone or default[0], args.image_size or default[1]


def crane(args: argparse.Namespace, tmp: Path) -> Pair:
    from anomalens.converters.crane import convert

    backbone, size = _clip_setup(args)
    options, dino_model = official_code.CRANE_CASES["crane"]
    common = {"backbone": backbone, "pretrained": None, "device": "cpu", "image_size": size}
    mods_context = official_code.crane_modules()
    mods = mods_context.__enter__()
    torch.manual_seed(0)
    ours = al.create("crane", official_compat=True, **options, **common)
    model, learner, _ = official_code.crane_official_model(mods, ours, dino_model, train=False)
    with torch.no_grad():  # non-trivial learned prompts
        for p in learner.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    torch.save({"prompt_learner": learner.state_dict()}, tmp / "epoch_5.pth")
    ours = convert(tmp / "epoch_5.pth", official_compat=True, **options, **common).eval()
    images = _images(args.batch, size)
    x = ours.backbone.preprocess(images)
    text = official_code.crane_official_text(model, learner)

    def theirs() -> np.ndarray:
        return official_code.crane_official_predict(mods, model, text, x, ours.layers, options["soft_mean"])[
            0
        ]

    return Pair(
        f"{backbone}@{size}, batch {args.batch}",
        lambda: ours.predict(images, "object", batch_size=args.batch).scores,
        theirs,
        "image scores",
        lambda: mods_context.__exit__(None, None, None),
    )


def aa_clip(args: argparse.Namespace, tmp: Path) -> Pair:
    size = 518 if args.official_sizes else 112
    mods_context = official_code.aa_clip_modules()
    mods = mods_context.__enter__()
    theirs_model, ours = official_code.aa_clip_pair(mods, tmp, size)
    images = _images(args.batch, size)
    x = ours.backbone.preprocess(images)
    text = official_code.aa_clip_official_text(mods, theirs_model, "bottle")

    def ours_fn() -> np.ndarray:
        p = ours.predict(images, "bottle", batch_size=args.batch)
        return np.concatenate([np.stack(p.maps).ravel(), p.extras["image_term"]])

    def theirs() -> np.ndarray:
        maps, terms = official_code.aa_clip_official_predict(mods, theirs_model, x, text)
        return np.concatenate([maps.numpy().ravel(), terms.numpy()])

    return Pair(
        f"{official_code.AA_CLIP_BACKBONE}@{size}, batch {args.batch}",
        ours_fn,
        theirs,
        "maps and image terms",
        lambda: mods_context.__exit__(None, None, None),
    )


def adaclip(args: argparse.Namespace, tmp: Path) -> Pair:
    backbone, size = _clip_setup(args)
    common = {"backbone": backbone, "pretrained": None, "device": "cpu", "image_size": size}
    mods_context = official_code.adaclip_modules()
    mods = mods_context.__enter__()
    model, ours = official_code.adaclip_pair(mods, tmp / "pretrained.pth", common, k_clusters=20)
    images = _images(1, size)
    x = ours.backbone.preprocess(images)
    seed = ours.config.kmeans_seed

    def theirs() -> np.ndarray:
        return official_code.adaclip_official_predict(model, x, "object", seed)[0].numpy()

    return Pair(
        f"{backbone}@{size}, batch 1",
        lambda: ours.predict(images, "object", batch_size=1).scores,
        theirs,
        "image scores",
        lambda: mods_context.__exit__(None, None, None),
    )


def anomalydino(args: argparse.Namespace, tmp: Path) -> Pair:
    size = 448 if args.official_sizes else 224
    mods_context = official_code.anomalydino_modules()
    mods = mods_context.__enter__()
    wrapper, ours = official_code.anomalydino_pair(mods, size)
    support = official_code.anomalydino_images(1, 0, size)
    tests = official_code.anomalydino_images(args.batch, 1, size)
    rotated = [r for image in support for r in mods.utils.augment_image(image)]
    bank = official_code.anomalydino_memory_bank(mods, wrapper, support)

    def theirs() -> np.ndarray:
        return official_code.anomalydino_official_predict(mods, wrapper, bank, tests)[0]

    return Pair(
        f"DINOv2 ViT-S/14@{size}, 1 support image (8 rotations), batch {args.batch}",
        lambda: ours.predict(tests, "object", support=rotated, batch_size=args.batch).scores,
        theirs,
        "image scores",
        lambda: mods_context.__exit__(None, None, None),
    )


def musc(args: argparse.Namespace, tmp: Path) -> Pair:
    from anomalens.methods.musc import layer_norm_map

    grid, n = (37, 16) if args.official_sizes else (16, 8)
    model = al.create("musc", backbone="test-tiny", pretrained=None, device="cpu", image_size=16 * grid)
    mods = official_code.musc_modules()
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(n, 1 + grid * grid, 1024, generator=g) * 3 + 1 for _ in range(4)]  # CLS first

    def ours() -> np.ndarray:
        with torch.no_grad():
            return model.mutual_scores([layer_norm_map(t[:, 1:]) for t in tokens]).numpy()

    def theirs() -> np.ndarray:
        with torch.no_grad():
            return official_code.musc_official_scores(mods, tokens, model.config.r_list).numpy()

    return Pair(
        f"scoring stage: {n} images, {grid}x{grid} patches, 4 layers of 1024, r in {model.config.r_list}",
        ours,
        theirs,
        "patch scores",
    )


# The official InCTRL in a worker: builds the model, saves its state for our converter, then scores query
# i (with the K support images) for each line "i" on its stdin, answering one JSON line per query.
INCTRL_WORKER = """
    import time

    data = torch.load(inp)
    cfg = data["config"]
    torch.manual_seed(0)
    model = InCTRL(None, cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], False, cast_dtype=None).eval()
    torch.save(model.state_dict(), out)
    tokenizer = open_clip.get_tokenizer("ViT-B-16-plus-240")
    images, support, name = data["images"], data["support"], data["class_name"]
    print("@@ready", flush=True)
    for line in sys.stdin:
        i = int(line)
        start = time.perf_counter()
        with torch.no_grad():
            final, _ = model(tokenizer, [images[i : i + 1], *[s[None] for s in support]], [name], None)
        seconds = time.perf_counter() - start
        print("@@" + json.dumps({"seconds": seconds, "scores": final.tolist()}), flush=True)
"""
# The small InCTRL of tests/test_parity_inctrl_steps.py: what the official code hard-codes (embedding
# 640, 240 px, patch 16, 12 blocks) kept, visual width 64 and a one-block text tower.
INCTRL_SMALL = {
    "embed_dim": 640,
    "vision_cfg": {"image_size": 240, "layers": 12, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1},
}


def inctrl(args: argparse.Namespace, tmp: Path) -> Pair:
    import open_clip

    from anomalens.converters.inctrl import convert

    if args.official_sizes:
        name = "ViT-B-16-plus-240"
        config = json.loads(
            (official_code.INCTRL / "open_clip" / "model_configs" / f"{name}.json").read_text()
        )
    else:
        name, config = "inctrl-bench-small", INCTRL_SMALL
        (tmp / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(tmp / f"{name}.json")
    shots, size = 4, 240
    images, support = _images(args.batch, size), _images(shots, size, seed=1)
    preprocess = al.create(
        "inctrl", backbone="test-tiny", pretrained=None, image_size=size
    ).backbone.preprocess
    inputs = {
        "config": config,
        "images": preprocess(images),
        "support": preprocess(support),
        "class_name": "bottle",
    }
    torch.save(inputs, tmp / "in.pt")
    (tmp / "runner.py").write_text(official_code.inctrl_script(INCTRL_WORKER))
    argv = [
        sys.executable,
        str(tmp / "runner.py"),
        str(official_code.INCTRL),
        str(tmp / "in.pt"),
        str(tmp / "out.pt"),
    ]
    worker = subprocess.Popen(
        argv, cwd=official_code.INCTRL, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )

    def answer() -> str:
        for line in worker.stdout:
            if line.startswith("@@"):
                return line[2:]
        raise RuntimeError("the official InCTRL worker stopped")

    answer()  # ready: its state is saved
    ckpt, clip = official_code.save_inctrl_checkpoint(torch.load(tmp / "out.pt"), tmp, "checkpoint.pyth")
    ours = convert(ckpt, backbone=name, pretrained=str(clip), device="cpu", official_compat=False)

    def theirs() -> np.ndarray:
        scores = []
        for i in range(args.batch):
            worker.stdin.write(f"{i}\n")
            worker.stdin.flush()
            scores += json.loads(answer())["scores"]
        return np.array(scores)

    def close() -> None:
        worker.stdin.close()
        worker.wait(timeout=60)

    return Pair(
        f"{name}@{size}, {shots} shots, batch {args.batch} (official: one query at a time)",
        lambda: ours.predict(images, "bottle", support=list(support), batch_size=args.batch).scores,
        theirs,
        "image scores",
        close,
    )


if __name__ == "__main__":
    main()
