"""The offline end-to-end demo (`anomalens demo`, `make demo`): train and evaluate on synthetic defects
with a random-weight `test-tiny` backbone; no download, a few minutes on a CPU."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    from anomalens.files import atomic_write
    from anomalens.methods import create, list_methods
    from anomalens.viz import class_report, html_report

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


def demo_summary(run: dict, out: str | os.PathLike) -> str:
    """What `anomalens demo` prints: the untrained/trained table, the files written, and what the
    numbers do (not) show, with the commands for real use."""
    from anomalens.engine import MODEL_FILE

    name = run["method"]
    written = ", ".join(str(Path(out) / f) for f in ("results.json", "results.md", "report.html", MODEL_FILE))
    return (
        f"{demo_table(run['untrained'], run['trained'])}\nwrote {written}\n"
        f"These are {name} numbers with a RANDOM-WEIGHT backbone (test-tiny, pretrained none) on\n"
        "synthetic data: they only show that the pipeline runs end to end and that training learns.\n"
        "For real use, with pretrained CLIP weights and your datasets:\n"
        f"  anomalens train --method {name} --data visa:/data/visa --pretrained openai --out runs/{name}\n"
        f"  anomalens eval --checkpoint runs/{name}/model.anomalens --data mvtec:/data/mvtec"
    )


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"
