"""`anomalens <command>`: thin argparse wrappers over the public API (DESIGN §3.5).

Every command calls public functions with the same argument names (`create`/`load`, `evaluate_method`,
`run_protocol`, `calibrate`, `benchmark`, `detect`, `run_demo`). Errors are one line on stderr,
``anomalens: error: <message>``, exit code 1 (2 for usage errors); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import os
import random
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from anomalens.recipes import RECIPE_NAMES

if TYPE_CHECKING:  # the CLI imports torch and the methods only when a command needs them
    from anomalens.data.types import Dataset, Record, Sample
    from anomalens.methods.base import Method

PROG = "anomalens"
DEMO_METHODS = ("aa-clip", "april-gan")  # the demo trains the first of these that is registered
# Per demo method: method options and a short CPU training schedule (engine overrides, per stage as
# "<stage>.<field>"), measured to beat chance on synthetic:defects with the random-weight test-tiny.
DEMO_SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "aa-clip": (
        {"image_size": 64},
        {"epochs": 6, "batch_size": 8, "text.lr": 1e-3, "image.lr": 3e-3, "augment": False},
    ),
    "april-gan": ({"image_size": 112}, {"epochs": 2}),
}
SHOWN_ROWS = 20  # detect prints its rows when there are at most this many


# ---------------------------------------------------------------------- public functions
@dataclass
class Detection:
    """What `detect` wrote: one (path, score, verdict or None) row per scored image, and failures."""

    csv_path: Path
    rows: list[tuple[str, float, str | None]] = field(default_factory=list)
    heatmaps: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Image files named by `inputs`: files, folders (searched recursively) and glob patterns.

    Folders and patterns yield files with an image suffix, skipping hidden ones (e.g. macOS "._x.png").
    """
    from anomalens.data.formats import IMAGE_SUFFIXES

    def images(paths: Sequence[str]) -> list[str]:
        return sorted(
            p
            for p in paths
            if p.lower().endswith(IMAGE_SUFFIXES)
            and not os.path.basename(p).startswith(".")
            and os.path.isfile(p)
        )

    files: dict[str, None] = {}  # ordered, without duplicates
    for item in inputs:
        if os.path.isdir(item):
            found = images([str(p) for p in Path(item).rglob("*")])
        elif os.path.isfile(item):
            found = [item]
        else:
            found = images(glob.glob(item, recursive=True))
        if not found:
            raise FileNotFoundError(f"no image found for {item!r}")
        files.update(dict.fromkeys(found))
    return list(files)


def detect(
    model: Method,
    inputs: Sequence[str],
    out: str | os.PathLike,
    *,
    class_name: str | None = None,
    support: Sequence[str] | None = None,
    threshold: float | None = None,
    batch_size: int = 16,
    heatmaps: bool = True,
    alpha: float = 0.5,
    progress: bool = True,
) -> Detection:
    """Score image files (files, folders, globs) with `model`; write `scores.csv` (path, score[, verdict])
    and, with `heatmaps`, an overlay PNG per image into `out/heatmaps`.

    threshold: verdicts use ``score > threshold``; default the model's calibrated `threshold` (none:
    no verdict column). Unreadable images are reported in `failures` and skipped.
    Heatmap colours span [0, 1] when a map lies in it (probability-like maps), else the map's own range.
    """
    from tqdm.auto import tqdm

    from anomalens.data import DataError, read_image
    from anomalens.viz import atomic_write, overlay, save_png

    files = expand_inputs(inputs)
    support_files = expand_inputs(support) if support else None
    if model.needs_support and not support_files:
        raise ValueError(
            f"method {model.name!r} is few-shot: pass --support with K normal images of the class"
        )
    threshold = model.threshold if threshold is None else threshold
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = Detection(out / "scores.csv")
    names: set[str] = set()
    bar = tqdm(total=len(files), desc="detect", unit="img", disable=not progress, leave=False)
    step = len(files) if model.set_level else batch_size  # a set-level method scores all files as one set
    for start in range(0, len(files), step):
        chunk, images = [], []
        for path in files[start : start + step]:
            try:
                images.append(read_image(path))
                chunk.append(path)
            except DataError as error:
                result.failures.append(str(error))
        if images:
            pred = model.predict(images, class_name, support=support_files, batch_size=batch_size)
            for path, image, score, amap in zip(chunk, images, pred.scores, pred.maps, strict=True):
                verdict = None if threshold is None else ("anomalous" if score > threshold else "normal")
                result.rows.append((path, float(score), verdict))
                if heatmaps:
                    in_unit = float(amap.min()) >= 0.0 and float(amap.max()) <= 1.0
                    vmin, vmax = (0.0, 1.0) if in_unit else (None, None)
                    name = _unique_stem(Path(path).stem, names)
                    result.heatmaps.append(
                        save_png(overlay(image, amap, alpha, vmin, vmax), out / "heatmaps" / f"{name}.png")
                    )
        bar.update(len(files[start : start + step]))
    bar.close()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score"] + ([] if threshold is None else ["verdict"]))
    for path, score, verdict in result.rows:
        writer.writerow([path, f"{score:.6g}"] + ([] if verdict is None else [verdict]))
    atomic_write(result.csv_path, buffer.getvalue())
    return result


def run_demo(
    out: str | os.PathLike = "runs/demo",
    method: str | None = None,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    n: int = 16,
    size: int = 64,
    classes: Sequence[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Offline end-to-end run: train a method on synthetic defects with a random-weight `test-tiny`
    backbone, evaluate it untrained and trained on unseen synthetic images, write results and a report.

    Training uses the test split of `synthetic:defects` generated with seed `seed + 1` (it holds
    anomalies with masks); evaluation uses the test split generated with `seed`, so no evaluated image
    was seen in training. n: images per class and label; classes: a subset of the synthetic classes.
    Returns {"untrained": results, "trained": results, "method": name}.
    """
    import torch

    import anomalens.data as al_data
    from anomalens.evaluation import evaluate_method, markdown_table, write_results
    from anomalens.methods import create, list_methods
    from anomalens.viz import atomic_write, class_report, html_report

    available = list_methods()
    name = method or next((m for m in DEMO_METHODS if m in available), None)
    if name is None:
        raise RuntimeError(f"no trainable demo method registered (looked for {', '.join(DEMO_METHODS)})")
    options, defaults = DEMO_SETTINGS.get(name, ({}, {}))
    given = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None}
    # A value given here replaces the demo's value for every stage.
    schedule = {k: v for k, v in defaults.items() if k.rpartition(".")[2] not in given} | given
    out = Path(out)
    eval_spec = f"synthetic:defects?n={n}&size={size}&seed={seed}"
    train_spec = f"synthetic:defects?n={n}&size={size}&seed={seed + 1}"
    torch.manual_seed(seed)
    model = create(name, backbone="test-tiny", pretrained=None, device=device, **options)
    if not model.training_stages():
        raise ValueError(f"method {name!r} does not learn; the demo needs a trainable method")
    eval_data = al_data.load(eval_spec, "test", classes)
    support = (
        {"shots": 1, "support_data": al_data.load(eval_spec, "train", classes)} if model.needs_support else {}
    )
    untrained = evaluate_method(model, eval_data, progress=progress, **support)
    model.fit(
        al_data.load(train_spec, "test", classes), out_dir=out, seed=seed, progress=progress, **schedule
    )
    sections = []
    trained = evaluate_method(
        model,
        eval_data,
        progress=progress,
        on_class=lambda r: sections.append(class_report(r, threshold=model.threshold)),
        **support,
    )
    write_results(untrained, out / "untrained")
    write_results(trained, out)
    comparison = demo_table(untrained, trained)
    atomic_write(out / "results.md", comparison + "\n" + markdown_table(trained))
    html_report(sections, out / "report.html", title=f"anomalens demo: {name} on synthetic defects (trained)")
    return {"method": name, "untrained": untrained, "trained": trained}


def demo_table(untrained: dict, trained: dict) -> str:
    """Untrained vs trained image and pixel AUROC (%), averaged over the classes of each dataset."""
    lines = ["| model | dataset | image AUROC | pixel AUROC |", "|---|---|---:|---:|"]
    for label, results in (("untrained", untrained), ("trained", trained)):
        for name, d in results["datasets"].items():
            cells = [_percent(d["mean"].get(m)) for m in ("image_auroc", "pixel_auroc")]
            lines.append(f"| {label} | {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def concat_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """One `Dataset` over several (each sample is decoded by the dataset it came from)."""
    from anomalens.data import Dataset

    if len(datasets) == 1:
        return datasets[0]
    owner = {}
    for d in datasets:
        for i, record in enumerate(d.records):
            owner.setdefault(record, (d, i))
    records = [r for d in datasets for r in d.records]

    def load(record: Record) -> Sample:
        d, i = owner[record]
        return d[i]

    return Dataset("+".join(d.name for d in datasets), records, load)


# ---------------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace) -> int:
    from anomalens.backbones import list_backbones
    from anomalens.methods import list_methods
    from anomalens.methods.base import method_class

    print("methods:")
    for name in list_methods():
        cls = method_class(name)
        kind = "trainable" if cls.trainable else "training-free"
        shots = "few-shot" if cls.needs_support else "zero-shot"
        print(
            f"  {name:<12} {kind:<13} {shots:<9} default: {cls.default_backbone} ({cls.default_pretrained})"
        )
    print("backbones (--backbone; --pretrained: an open_clip tag, 'openai', a file, or 'none'):")
    print("  " + ", ".join(list_backbones()))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    model = _onnx_model(args.onnx, args) if args.onnx else _model(args)
    result = detect(
        model,
        args.inputs,
        args.out,
        class_name=args.class_name,
        support=args.support,
        threshold=args.threshold,
        batch_size=args.batch_size,
        heatmaps=not args.no_heatmaps,
        alpha=args.alpha,
        progress=not args.quiet,
    )
    if len(result.rows) <= SHOWN_ROWS:
        for path, score, verdict in result.rows:
            print("\t".join([f"{score:.6g}", *([verdict] if verdict else []), path]))
    where = f" and heatmaps into {Path(args.out) / 'heatmaps'}" if result.heatmaps else ""
    print(f"scored {len(result.rows)} image(s): {result.csv_path}{where}")
    if result.rows and result.rows[0][2] is None:
        print("no verdicts: the model has no threshold (run `anomalens calibrate` or pass --threshold)")
    if result.failures:
        for failure in result.failures:
            _warn(failure)
        raise ValueError(
            f"{len(result.failures)} of {len(result.failures) + len(result.rows)} image(s) unreadable"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import anomalens.data as al_data
    from anomalens.engine import MODEL_FILE
    from anomalens.recipes import recipe as named_recipe

    recipe = named_recipe(args.method or "", args.recipe) if args.recipe else None
    if recipe is not None:  # the recipe's method options first: the user's --set wins
        args.options = [f"{k}={json.dumps(v)}" for k, v in recipe.options.items()] + args.options
    split = args.split or (recipe.split if recipe is not None else "test")
    dataset = concat_datasets([al_data.load(spec, split, args.classes) for spec in args.data])
    model = _model(args, allow_checkpoint=False)
    model.recipe = recipe.describe() if recipe is not None else None
    dataset = al_data.shot_subset(dataset, args.shots, model.shot_semantics, seed=args.seed)
    if args.normal_only:
        dataset = al_data.normal_only(dataset)
    # Few-shot methods draw training supports from every normal image (train/good + test/good, the
    # official InCTRL normal list), whatever split the queries come from.
    support_data = (
        concat_datasets([al_data.load(spec, "all", args.classes) for spec in args.data])
        if model.needs_support
        else None
    )
    given = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "amp": args.amp or None}
    user = _parse_options(args.train_options, "--train-set")
    user |= {k: v for k, v in given.items() if v is not None}
    # A recipe's per-stage value ("image.lr") must not win over the user's value for every stage ("lr").
    recipe_train = recipe.train if recipe is not None else {}
    overrides = {k: v for k, v in recipe_train.items() if k.rpartition(".")[2] not in user} | user
    model.fit(
        dataset,
        support_data=support_data,
        out_dir=args.out,
        resume=args.resume,
        seed=args.seed,
        stages=args.stages,
        progress=not args.quiet,
        **overrides,
    )
    path = Path(args.out) / MODEL_FILE  # written by the engine after every epoch
    print(f"trained {model.name} on {dataset.name} ({len(dataset)} images): {path}")
    print(f"next: anomalens eval --checkpoint {path} --data <kind>:<root>")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import anomalens.data as al_data
    from anomalens.evaluation import ClassResult, markdown_table, write_results
    from anomalens.protocols import run_protocol
    from anomalens.viz import ClassReport, class_report, html_report

    for spec in args.data:  # a mistyped spec fails before a large model is loaded
        al_data.parse_spec(spec)
    model = _model(args)
    protocol = args.protocol or _default_protocol(args.shots, args.seeds)
    collected: dict[tuple[str, str], ClassReport] = {}

    def collect(r: ClassResult) -> None:  # the report shows the first run of each class (first K, draw)
        if (r.dataset_name, r.class_name) not in collected:
            collected[(r.dataset_name, r.class_name)] = class_report(r, threshold=model.threshold)

    results = run_protocol(
        protocol,
        model,
        args.data,
        shots=args.shots,
        seeds=args.seeds,
        support_seed=args.support_seed,
        split=args.split,
        classes=args.classes,
        batch_size=args.batch_size,
        eval_resolution=args.eval_resolution,
        aupro_variant=args.aupro,
        progress=not args.quiet,
        on_class=collect if args.report else None,
    )
    path = write_results(results, args.out)
    print(markdown_table(results))
    print(f"results: {path} and {path.with_suffix('.md')}")
    if args.report:
        title = f"anomalens eval: {model.name}, {protocol}"
        if protocol == "generalist":
            title += f" (images of the first run: K={results['shots'][0]}, seed {results['seeds'][0]})"
        report = html_report(list(collected.values()), Path(args.out) / "report.html", title=title)
        print(f"report: {report}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from anomalens.evaluation import bench_table, benchmark
    from anomalens.methods import list_methods
    from anomalens.viz import atomic_write

    results = benchmark(
        args.methods or list_methods(),
        backbone=args.backbone,
        pretrained=args.pretrained,
        batch_sizes=args.batch_sizes,
        image_size=args.image_size,
        device=args.device,
        iters=args.iters,
        warmup=args.warmup,
        shots=args.shots,
        seed=args.seed,
        progress=not args.quiet,
        options=_parse_options(args.options),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = bench_table(results)
    atomic_write(out / "bench.json", json.dumps(results, indent=2) + "\n")
    atomic_write(out / "bench.md", table)
    print(table)
    print(f"results: {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    device = "cpu" if args.device == "auto" else args.device
    run = run_demo(
        args.out,
        args.method,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        n=args.n,
        size=args.size,
        classes=args.classes,
        device=device,
        seed=args.seed,
        progress=not args.quiet,
    )
    out = Path(args.out)
    print(demo_table(run["untrained"], run["trained"]))
    written = ("results.json", "results.md", "report.html", "model.anomalens")
    print("wrote " + ", ".join(str(out / name) for name in written))
    print(
        f"These are {run['method']} numbers with a RANDOM-WEIGHT backbone (test-tiny, pretrained none) on\n"
        "synthetic data: they only show that the pipeline runs end to end and that training learns.\n"
        "For real use, with pretrained CLIP weights and your datasets:\n"
        f"  anomalens train --method {run['method']} --data visa:/data/visa --pretrained openai "
        f"--out runs/{run['method']}\n"
        f"  anomalens eval --checkpoint runs/{run['method']}/model.anomalens --data mvtec:/data/mvtec"
    )
    trained = [d["mean"].get("image_auroc") for d in run["trained"]["datasets"].values()]
    if not all(v is not None and v > 0.5 for v in trained):
        raise RuntimeError(f"the trained model did not beat chance (image AUROC {_percent(trained[0])} %)")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import anomalens.data as al_data

    splits = ("train", "test") if args.split == "all" else (args.split,)
    print(f"{args.spec}")
    print("| split | class | images | normal | anomalous | with mask |")
    print("|---|---|---:|---:|---:|---:|")
    problems: list[str] = []
    found = 0
    for split in splits:
        try:
            dataset = al_data.load(args.spec, split, args.classes)
        except al_data.DataError as error:
            if "no images in split" not in str(error):
                raise
            print(f"| {split} | (none) | 0 | 0 | 0 | 0 |")
            continue
        found += len(dataset)
        info = al_data.describe(dataset)
        for cls, c in info["classes"].items():
            print(
                f"| {split} | {cls} | {c['images']} | {c['normal']} | {c['anomalous']} | {c['with_mask']} |"
            )
        print(
            f"| {split} | **all** | {info['images']} | {info['normal']} | {info['anomalous']} "
            f"| {info['with_mask']} |"
        )
        if args.verify:
            chunk = 64
            for start in tqdm(
                range(0, len(dataset), chunk), desc=f"verify {split}", disable=args.quiet, leave=False
            ):
                indices = range(start, min(start + chunk, len(dataset)))
                problems += al_data.verify(dataset.subset(indices))
    if not found:
        raise al_data.DataError(f"no images in {args.spec}")
    if not args.verify:
        print("(images not decoded: --no-verify)")
        return 0
    if problems:
        for problem in problems:
            print(f"bad file: {problem}")
        raise al_data.DataError(f"{len(problems)} file(s) of {args.spec} cannot be read (listed above)")
    print(f"all {found} images (and their masks) decode")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import anomalens.data as al_data
    from anomalens.calibrate import calibrate

    if (args.data is None) == (args.normals is None):
        _usage_error("calibrate needs --data SPEC or --normals FILES (one of them)")
    model = _model(args, allow_method=False)
    result = calibrate(
        model,
        images=expand_inputs(args.normals) if args.normals else None,
        data=al_data.load(args.data, args.split, args.classes) if args.data else None,
        rule=args.rule,
        percentile=args.percentile,
        support=expand_inputs(args.support) if args.support else None,
        class_name=args.class_name,
        batch_size=args.batch_size,
    )
    path = model.save(args.out or args.checkpoint)
    how = f"F1 {result.f1:.3f}" if result.rule == "f1" else f"{result.percentile:g}th percentile of normals"
    print(
        f"threshold {result.threshold:.6g} ({result.rule}: {how}; {result.n_normal} normal, "
        f"{result.n_anomalous} anomalous images) stored in {path}"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from anomalens.converters import convert

    options = _parse_options(args.options)
    if args.backbone:
        options["backbone"] = args.backbone
    if args.pretrained != "default":
        options["pretrained"] = args.pretrained
    method = convert(args.source, args.checkpoint, **options)
    path = method.save(args.out)
    print(f"wrote {path} ({method.name}, backbone {method.backbone.name})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from anomalens.serve import run

    run(
        _model(args),
        host=args.host,
        port=args.port,
        class_name=args.class_name,
        support=args.support,
        threshold=args.threshold,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        log_level="warning" if args.quiet else "info",
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from anomalens.export import export_onnx

    support = expand_inputs(args.support) if args.support else None
    path = export_onnx(_model(args), args.out, args.class_names, support=support, opset=args.opset)
    print(f"wrote {path} (classes: {', '.join(args.class_names)})")
    return 0


def _onnx_model(path: str, args: argparse.Namespace) -> Any:
    """`detect --onnx`: an exported model run by ONNX Runtime (no torch), in place of a method."""
    from anomalens.onnx_model import OnnxModel

    if args.checkpoint or args.method or args.support:
        _usage_error("--onnx replaces --checkpoint/--method/--support (the export holds its support set)")
    return OnnxModel(path)


# ---------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``anomalens: error: <message> (see '<prog> --help')``."""

    def error(self, message: str) -> NoReturn:
        _usage_error(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The `anomalens` argument parser (global options are accepted before or after the command)."""
    parser = _Parser(prog=PROG, description="Vision-language anomaly detection and segmentation.")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _global_options(p, suppress=True)
        p.set_defaults(handler=handler)
        return p

    command("list", cmd_list, "list methods and backbones")

    p = command("detect", cmd_detect, "score images (files, folders, globs): scores.csv + heatmap PNGs")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or glob patterns")
    _model_options(p)
    p.add_argument("--support", nargs="+", help="K normal images of the class (few-shot methods)")
    p.add_argument("--class-name", help="object/class name given to the method (default 'object')")
    p.add_argument("--threshold", type=float, help="verdict threshold (default: the checkpoint's)")
    p.add_argument("--out", default="runs/detect", help="output folder (default runs/detect)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlays")
    p.add_argument("--no-heatmaps", action="store_true", help="write scores only")
    p.add_argument("--onnx", help="an exported model (.onnx), run with ONNX Runtime instead of torch")

    p = command("train", cmd_train, "train a method on dataset(s) and write <out>/model.anomalens")
    _model_options(p, checkpoint=False)
    p.add_argument("--data", action="append", required=True, help="dataset spec (repeatable)")
    p.add_argument(
        "--split",
        help="split to train on (default: the recipe's, else test: the papers train on another "
        "dataset's test split)",
    )
    p.add_argument(
        "--recipe",
        choices=RECIPE_NAMES,
        help="training settings of the method's released code or of its paper (docs/recipes.md); "
        "other flags still win",
    )
    p.add_argument("--classes", type=_names, help="comma-separated subset of classes")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, model.anomalens)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--shots",
        type=_shots_or_full,
        help="few-shot training subset, or 'full'; N is the method's: aa-clip N images per class "
        "(N/2 normal + N/2 anomalous), core-clip and others N normal + N anomalous per class; "
        "inctrl(v2) train on a whole dataset (their K-shot is eval --shots)",
    )
    p.add_argument(
        "--amp", action="store_true", help="bf16/fp16 autocast on CUDA (default fp32, as the papers' code)"
    )
    p.add_argument("--stages", type=_names, help="comma-separated training stages to run (default all)")
    p.add_argument(
        "--normal-only", action="store_true", help="train on the normal images only (CoRe-CLIP C.1 protocol)"
    )
    p.add_argument(
        "--train-set",
        dest="train_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training option for every stage (lr=1e-4) or one (image.lr=1e-4); repeatable",
    )

    p = command("eval", cmd_eval, "evaluate a checkpoint or method: results.json, markdown table, report")
    _model_options(p)
    p.add_argument("--data", action="append", required=True, help="dataset spec (repeatable)")
    p.add_argument("--split", default="test")
    p.add_argument("--classes", type=_names, help="comma-separated subset of classes")
    p.add_argument(
        "--protocol", choices=_protocols(), help="default: zero-shot, or fewshot/generalist from --shots"
    )
    p.add_argument("--shots", type=_ints, help="K normal support images per class, e.g. 4 or 1,2,4")
    p.add_argument("--seeds", type=int, help="support draws per K (generalist protocol; default 3)")
    p.add_argument("--support-seed", type=int, default=0, help="seed of the (first) support draw")
    p.add_argument(
        "--eval-resolution",
        choices=("input", "model"),
        default="input",
        help="score at each image's resolution, or at the model's input size as official code",
    )
    p.add_argument("--aupro", choices=("mvtec", "sampled"), default="mvtec", help="AUPRO variant")
    p.add_argument("--report", action="store_true", help="also write <out>/report.html with heatmaps")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--batch-size", type=int, default=16)

    p = command("bench", cmd_bench, "throughput, latency p50/p95 and peak memory on synthetic images")
    p.add_argument("--methods", type=_names, help="comma-separated methods (default all)")
    p.add_argument("--backbone", help="backbone for every method (default each method's)")
    p.add_argument("--pretrained", type=_pretrained, default="default", help="'none' = random weights")
    _set_option(p, "option for every benchmarked method (repeatable)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    p.add_argument("--image-size", type=int, default=512, help="side of the synthetic input images")
    p.add_argument("--iters", type=int, default=10, help="timed batches per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--shots", type=int, default=1, help="support images for few-shot methods")
    p.add_argument("--out", default="runs/bench")

    p = command("demo", cmd_demo, "offline end-to-end demo on synthetic data (CPU, a few minutes)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--method", help=f"trainable method (default the first of {', '.join(DEMO_METHODS)})")
    p.add_argument("--epochs", type=int, help="override the demo schedule")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--n", type=int, default=16, help="synthetic images per class and label")
    p.add_argument("--size", type=int, default=64, help="synthetic image side")
    p.add_argument("--classes", type=_names, help="subset of the synthetic classes (default all five)")

    p = command("data", cmd_data, "describe a dataset spec and verify that every image and mask decodes")
    p.add_argument("spec", help="dataset spec, e.g. mvtec:/data/mvtec")
    p.add_argument("--split", choices=("train", "test", "all"), default="all")
    p.add_argument("--classes", type=_names)
    p.add_argument("--no-verify", dest="verify", action="store_false", help="counts only, decode nothing")

    p = command("calibrate", cmd_calibrate, "store a verdict threshold in a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pretrained", type=_pretrained, default="default", help="override the stored tag")
    p.add_argument("--data", help="labelled dataset spec (F1-max threshold) or normal-only (percentile)")
    p.add_argument("--split", default="test")
    p.add_argument("--classes", type=_names)
    p.add_argument("--normals", nargs="+", help="normal images (files, folders, globs): percentile rule")
    p.add_argument("--rule", choices=("auto", "percentile", "f1"), default="auto")
    p.add_argument("--percentile", type=float, default=99.0)
    p.add_argument("--support", nargs="+", help="K normal images (few-shot methods)")
    p.add_argument("--class-name")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="write the calibrated checkpoint here (default: update --checkpoint)")

    p = command("convert", cmd_convert, "convert an official checkpoint into an anomalens model file")
    p.add_argument("checkpoint", help="the official checkpoint file")
    p.add_argument("--from", dest="source", required=True, choices=("aa-clip", "crane", "inctrl"))
    p.add_argument("--out", required=True, help="output model file (.anomalens)")
    p.add_argument("--backbone", help="backbone name (default: the method's)")
    p.add_argument("--pretrained", type=_pretrained, default="default", help="'none' = random weights")
    _set_option(p, "method/converter option, e.g. configuration=crane+ for Crane (repeatable)")

    p = command("serve", cmd_serve, "HTTP API and web page over a model (the [serve] extra; docs/serve.md)")
    _model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--class-name", default="object", help="class of requests that name none")
    p.add_argument(
        "--support",
        help="folder of normal images (few-shot): its own for --class-name, sub-folders per class",
    )
    p.add_argument("--threshold", type=float, help="verdict threshold (default: the checkpoint's)")
    p.add_argument("--max-batch-size", type=int, default=8, help="images per micro-batch (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for a batch to fill (default 5)")
    p.add_argument("--max-queue", type=int, default=64, help="queued images before 503 (default 64)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="request size limit, 413 (default 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, 413 (default 40e6)")
    p = command("export", cmd_export, "export a model to ONNX (docs/export.md): scores and maps, no torch")
    _model_options(p)
    p.add_argument(
        "--class-name",
        dest="class_names",
        action="append",
        required=True,
        help="class to bake in (repeatable)",
    )
    p.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default onnx)")
    p.add_argument("--support", nargs="+", help="normal images baked in (few-shot methods)")
    p.add_argument("--out", required=True, help="output file (.onnx)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `anomalens` console script; returns the exit code."""
    try:
        return _run(build_parser(), argv)
    except SystemExit as exit_:  # usage errors and --help
        return exit_.code if isinstance(exit_.code, int) else 1


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Warnings and library log records become "anomalens: warning: ..." lines, unless --debug.
    log_handler = logging.StreamHandler(sys.stderr)
    log_handler.setLevel(logging.WARNING)
    log_handler.setFormatter(_OneLineFormatter())
    root = logging.getLogger()
    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = lambda message, *_a, **_k: _warn(str(message))
            root.addHandler(log_handler)
        try:
            _seed_everything(args.seed)
            return args.handler(args)
        except KeyboardInterrupt:
            print(f"{PROG}: error: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # every failure becomes one line unless --debug
            if args.debug:
                traceback.print_exc()
            print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
            return 1
        finally:
            root.removeHandler(log_handler)


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {' '.join(record.getMessage().split())}"


# ---------------------------------------------------------------------- helpers
def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--device", default=default("auto"), help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=default(0), help="random seed (default 0)")
    parser.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", default=default(False), help="no progress bars")


def _set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` method-option flag (parsed by `_parse_options`)."""
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE", help=help)


def _model_options(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    if checkpoint:
        parser.add_argument("--checkpoint", help="a saved model (.anomalens)")
    parser.add_argument("--method", help="a registered method (see `anomalens list`)")
    parser.add_argument("--backbone", help="backbone name (default: the method's)")
    parser.add_argument(
        "--pretrained",
        type=_pretrained,
        default="default",
        help="open_clip tag, 'openai', a weights file, or 'none' for random weights",
    )
    _set_option(parser, "method option (JSON value or string; repeatable)")


def _model(args: argparse.Namespace, allow_checkpoint: bool = True, allow_method: bool = True) -> Method:
    """The method named by --checkpoint or --method (+ --backbone/--pretrained/--set)."""
    from anomalens.methods import create, load

    checkpoint = getattr(args, "checkpoint", None) if allow_checkpoint else None
    method = getattr(args, "method", None) if allow_method else None
    if checkpoint and method:
        _usage_error("give --checkpoint or --method, not both")
    if checkpoint:
        if getattr(args, "options", None) or getattr(args, "backbone", None):
            _usage_error("--set/--backbone apply to --method; a checkpoint stores its own")
        return load(checkpoint, device=args.device, pretrained=args.pretrained)
    if not method:
        _usage_error("give --checkpoint or --method" if allow_checkpoint else "give --method")
    return create(
        method,
        backbone=args.backbone,
        pretrained=args.pretrained,
        device=args.device,
        **_parse_options(args.options),
    )


def _parse_options(pairs: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """KEY=VALUE pairs → {key: JSON value, or the string when it is not JSON}."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _usage_error(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _default_protocol(shots: list[int] | None, seeds: int | None) -> str:
    if not shots:
        return "zero-shot"
    return "fewshot" if len(shots) == 1 and seeds in (None, 1) else "generalist"


def _protocols() -> tuple[str, ...]:
    from anomalens.protocols import PROTOCOLS

    return PROTOCOLS


def _pretrained(value: str) -> str | None:
    return None if value.strip().lower() in ("none", "random") else value


def _names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return names


def _ints(value: str) -> list[int]:
    try:
        numbers = [int(v) for v in _names(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if any(n < 1 for n in numbers):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return numbers


def _shots_or_full(value: str) -> int | str:
    if value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'full', got {value!r}") from None


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _unique_stem(stem: str, taken: set[str]) -> str:
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    taken.add(name)
    return name


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) or not text:  # KeyError's str is just the quoted key
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {' '.join(message.split())}", file=sys.stderr)


def _usage_error(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
