"""The offline end-to-end demo (`anomalens demo`, `make demo`): zero-shot transfer on the shipped
`anomalens-mini` CLIP. A method is trained on some generated classes and evaluated on held-out classes
that neither the backbone nor the method ever saw, next to its untrained self and WinCLIP zero-shot;
no download, about a minute on a CPU."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEMO_METHODS = ("aa-clip", "april-gan")  # the demo trains the first of these that is registered
DEMO_BACKBONE = "anomalens-mini"  # backbone and shipped weights (docs/anomalens-mini.md)
ZERO_SHOT = "winclip"  # the training-free reference row
# Per demo method: method options and a short CPU training schedule (engine overrides, per stage as
# "<stage>.<field>"), for anomalens-mini on the method-training classes of synthetic:transfer.
DEMO_SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "aa-clip": ({}, {"epochs": 8, "batch_size": 8, "text.lr": 1e-3, "image.lr": 3e-3, "augment": False}),
    "april-gan": ({}, {"epochs": 4, "batch_size": 8, "augment": False}),
}


def run_demo(
    out: str | os.PathLike = "runs/demo",
    method: str | None = None,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    n: int = 16,
    size: int = 48,
    classes: Sequence[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Offline zero-shot transfer run on the shipped `anomalens-mini` CLIP: train a method on the
    method-training classes of `synthetic:transfer`, evaluate it untrained and trained on the held-out
    classes (unseen by the backbone's pre-training and by the method), next to WinCLIP zero-shot; write
    results and a report.

    Training uses the test split of the training classes generated with seed `seed + 1` (it holds
    anomalies with masks); evaluation uses the test split of the held-out classes generated with `seed`.
    n: images per class and label; classes: a subset of the held-out classes to evaluate on.
    Returns {"method": name, "untrained": results, "trained": results, "zero_shot": WinCLIP results,
    "train_classes": [...], "eval_classes": [...]}.
    """
    import torch

    import anomalens.data as al_data
    from anomalens.data.captions import class_names
    from anomalens.evaluation import evaluate_method, markdown_table, write_results
    from anomalens.files import atomic_write
    from anomalens.methods import create, list_methods
    from anomalens.viz import class_report, html_report

    available = list_methods()
    name = method or next((m for m in DEMO_METHODS if m in available), None)
    if name is None:
        raise RuntimeError(f"no trainable demo method registered (looked for {', '.join(DEMO_METHODS)})")
    heldout, train_classes = class_names("heldout"), class_names("train")
    eval_classes = list(classes or heldout)
    unknown = [c for c in eval_classes if c not in heldout]
    if unknown:
        raise ValueError(
            f"--classes: {', '.join(unknown)} not held-out class(es); choose from {', '.join(heldout)}"
        )
    options, defaults = DEMO_SETTINGS.get(name, ({}, {}))
    given = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None}
    # A value given here replaces the demo's value for every stage.
    schedule = {k: v for k, v in defaults.items() if k.rpartition(".")[2] not in given} | given
    out = Path(out)
    eval_spec = f"synthetic:transfer?n={n}&size={size}&seed={seed}"
    train_spec = f"synthetic:transfer?n={n}&size={size}&seed={seed + 1}"
    torch.manual_seed(seed)
    model = create(name, backbone=DEMO_BACKBONE, pretrained=DEMO_BACKBONE, device=device, **options)
    if not model.training_stages():
        raise ValueError(f"method {name!r} does not learn; the demo needs a trainable method")
    eval_data = al_data.load(eval_spec, "test", eval_classes)
    support = (
        {"shots": 1, "support_data": al_data.load(eval_spec, "train", eval_classes)}
        if model.needs_support
        else {}
    )
    reference = create(ZERO_SHOT, backbone=DEMO_BACKBONE, pretrained=DEMO_BACKBONE, device=device)
    zero_shot = evaluate_method(reference, eval_data, progress=progress)
    untrained = evaluate_method(model, eval_data, progress=progress, **support)
    training = al_data.load(train_spec, "test", train_classes)
    model.fit(training, out_dir=out, seed=seed, progress=progress, **schedule)
    sections = []
    trained = evaluate_method(
        model,
        eval_data,
        progress=progress,
        on_class=lambda r: sections.append(class_report(r, threshold=model.threshold)),
        **support,
    )
    write_results(zero_shot, out / ZERO_SHOT)
    write_results(untrained, out / "untrained")
    write_results(trained, out)
    run = {
        "method": name,
        "untrained": untrained,
        "trained": trained,
        "zero_shot": zero_shot,
        "train_classes": train_classes,
        "eval_classes": eval_classes,
    }
    atomic_write(out / "results.md", demo_table(run) + "\n" + markdown_table(trained))
    title = f"anomalens demo: {name} on anomalens-mini, trained on other classes, on held-out classes"
    html_report(sections, out / "report.html", title=title)
    return run


def demo_table(run: dict) -> str:
    """Image and pixel AUROC (%) on the held-out classes: WinCLIP zero-shot, the method untrained and
    trained, averaged over the classes."""
    lines = ["| model | dataset | image AUROC | pixel AUROC |", "|---|---|---:|---:|"]
    name = run["method"]
    rows = (
        (f"{ZERO_SHOT} zero-shot", "zero_shot"),
        (f"{name} untrained", "untrained"),
        (f"{name} trained", "trained"),
    )
    for label, key in rows:
        for dataset, d in run[key]["datasets"].items():
            cells = [_percent(d["mean"].get(m)) for m in ("image_auroc", "pixel_auroc")]
            lines.append(f"| {label} | {dataset} (held-out) | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def demo_summary(run: dict, out: str | os.PathLike) -> str:
    """What `anomalens demo` prints: the transfer table, the files written, and what the numbers do
    (not) show, with the commands for real use."""
    from anomalens.engine import MODEL_FILE

    name = run["method"]
    written = ", ".join(str(Path(out) / f) for f in ("results.json", "results.md", "report.html", MODEL_FILE))
    return (
        f"{demo_table(run)}\nwrote {written}\n"
        f"{name} was trained on the classes {', '.join(run['train_classes'])} and evaluated on the held-out\n"
        f"classes {', '.join(run['eval_classes'])}, which neither it nor the backbone's pre-training saw.\n"
        f"The backbone is {DEMO_BACKBONE}, a TOY CLIP pre-trained here on generated images: these numbers\n"
        "show zero-shot transfer inside that generated world, nothing about accuracy on real data.\n"
        "For real use, with pretrained CLIP weights and your datasets:\n"
        f"  anomalens train --method {name} --data visa:/data/visa --pretrained openai --out runs/{name}\n"
        f"  anomalens eval --checkpoint runs/{name}/model.anomalens --data mvtec:/data/mvtec"
    )


def check_transfer(run: dict) -> None:
    """Raise RuntimeError unless the trained model beat chance (image AUROC > 0.5) on every held-out
    dataset of `run` (what `anomalens demo` checks after printing its summary)."""
    trained = [d["mean"].get("image_auroc") for d in run["trained"]["datasets"].values()]
    if not all(v is not None and v > 0.5 for v in trained):
        raise RuntimeError(f"the trained model did not beat chance (image AUROC {_percent(trained[0])} %)")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"
