"""`anomalens reproduce METHOD`: a method's paper protocol end to end, measured beside the published numbers.

A protocol is a list of legs; each leg trains the method with its recipe on an auxiliary dataset and
evaluates the trained model on a target dataset (or evaluates a converted official checkpoint without
training). The data root holds one folder per dataset, named as the protocol reads it:

* ``<root>/mvtec`` (MVTec AD layout), ``<root>/visa`` (VisA with ``split_csv/1cls.csv``),
* ``<root>/caad`` (a ``contextual:`` manifest in the CAAD-3K schema, for CoRe-CLIP).

Protocols (docs/recipes.md has the settings of each recipe):

* aa-clip (paper 002 Tables 1-2): train on the VisA test split, evaluate MVTec AD; and the reverse.
* crane, crane+ (paper 003 Table 1): train on the MVTec AD test split, evaluate VisA; and the reverse.
* inctrl, inctrlv2 (paper 001 §5.1, Table 2): train on MVTec AD, evaluate VisA with K = 1, 2, 4 normal
  supports × 3 support draws (the generalist protocol); train on VisA, evaluate MVTec AD the same way.
* core-clip (paper 000 A.10, Table 1): for N = 1, 2, 4 train on N normal + N anomalous images per class of
  the seen-context rows (CAAD-SS), evaluate on the cross-context rows (CAAD-CC).

Evaluation scores maps at the model's input size, as the official evaluators do (`eval_resolution`).
Outputs in `out`: ``results.json`` (every leg's results document and the comparison rows),
``table.md`` (the paper's main table: measured beside published, with paper, table and column) and
each leg's training run (``<leg>/model.anomalens``, ``train_log.jsonl``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalens.methods.base import Method

EVAL_RESOLUTION = "model"  # official evaluators score maps at the model's input size


@dataclass(frozen=True)
class Leg:
    """One train → evaluate step of a protocol.

    Attributes:
        train: dataset folder the method trains on (key of `DATASETS`).
        evaluate: dataset folder the trained model is evaluated on.
        train_shots: N-shot training subset (the method's shot semantics); None = the whole split.
        eval_shots: K normal supports at evaluation (generalist protocol); () = zero-shot.
    """

    train: str
    evaluate: str
    train_shots: int | None = None
    eval_shots: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        shots = f"-{self.train_shots}shot" if self.train_shots is not None else ""
        return f"{self.train}{shots}-to-{self.evaluate}"


@dataclass(frozen=True)
class Protocol:
    """A method's paper protocol: which registered method and recipe, with which legs.

    Attributes:
        method: registered method (`create`) the protocol runs.
        recipe: recipe name (`anomalens.recipes`).
        legs: the train → evaluate steps.
        options: method options on top of the recipe's (e.g. Crane+'s configuration).
        seeds: support draws per K (generalist protocol only).
    """

    method: str
    recipe: str
    legs: tuple[Leg, ...]
    options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 1


# Spec templates of the dataset folders under the data root.
DATASETS = {"mvtec": "mvtec:{root}/mvtec", "visa": "visa:{root}/visa", "caad": "contextual:{root}/caad"}

_CROSS = (Leg("visa", "mvtec"), Leg("mvtec", "visa"))
_GENERALIST = (Leg("mvtec", "visa", eval_shots=(1, 2, 4)), Leg("visa", "mvtec", eval_shots=(1, 2, 4)))


def _crane_options(name: str) -> dict[str, Any]:
    from anomalens.methods.crane import CONFIGURATIONS

    return dict(CONFIGURATIONS[name])


def protocols() -> dict[str, Protocol]:
    """Every reproducible method's protocol, by the name `reproduce` takes."""
    return {
        "aa-clip": Protocol("aa-clip", "official", _CROSS),
        "crane": Protocol("crane", "official", _CROSS[::-1], _crane_options("crane")),
        "crane+": Protocol("crane", "official", _CROSS[::-1], _crane_options("crane+")),
        "inctrl": Protocol("inctrl", "official", _GENERALIST, seeds=3),
        "inctrlv2": Protocol("inctrlv2", "paper", _GENERALIST, seeds=3),
        "core-clip": Protocol(
            "core-clip", "paper", tuple(Leg("caad", "caad", train_shots=n) for n in (1, 2, 4))
        ),
    }


def published(method: str) -> list[dict[str, Any]]:
    """The published numbers of `method` (``resources/published.json``), each with its citation."""
    doc = json.loads(resources.files("anomalens").joinpath("resources/published.json").read_text())
    papers = doc["papers"]
    return [
        {**n, "citation": papers[n["paper"]]["citation"]} for n in doc["numbers"] if n["method"] == method
    ]


def reproduce(
    method: str,
    data_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    weights: Mapping[str, str] | Sequence[str] | None = None,
    backbone: str | None = None,
    pretrained: str | None = "default",
    options: Mapping[str, Any] | None = None,
    train_options: Mapping[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Run `method`'s paper protocol on the datasets under `data_root`; write and return the comparison.

    weights: converted official checkpoints (``anomalens convert``), evaluated without training: a
        mapping {training dataset: file} (e.g. {"visa": "aa_visa.anomalens"}, or ``["visa=FILE"]``), or
        one file for a protocol whose legs all train on one dataset; only the legs with weights run.
    options, train_options: method options and TrainConfig overrides on top of the recipe's (e.g. a
        tiny schedule ``{"epochs": 1}`` for a smoke run); backbone/pretrained as for `create`.
    Returns ``{"method", "protocol", "recipe", "legs": {leg: results document}, "rows": [...]}``
    where each row puts a measured metric beside its published value.
    """
    table = protocols()
    if method not in table:
        raise ValueError(f"no reproduction protocol for {method!r}; available: {', '.join(table)}")
    protocol = table[method]
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root: folder not found: {root}")
    chosen = _weights_by_leg(protocol, weights)
    out = Path(out)
    legs: dict[str, dict] = {}
    for leg in protocol.legs:
        if chosen is not None and leg not in chosen:
            continue
        if chosen is not None:
            from anomalens.methods import load

            model = load(chosen[leg], device=device, pretrained=pretrained)
        else:
            model = _train_leg(
                protocol,
                leg,
                root,
                out / leg.name,
                backbone,
                pretrained,
                options,
                train_options,
                device,
                seed,
                progress,
            )
        legs[leg.name] = _evaluate_leg(protocol, leg, model, root, batch_size, seed, progress)
    rows = compare(method, protocol, legs)
    result = {
        "method": method,
        "protocol": [leg.name for leg in protocol.legs],
        "recipe": protocol.recipe,
        "evaluated_only": chosen is not None,
        "legs": legs,
        "rows": rows,
    }
    from anomalens.files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(result, indent=1))
    atomic_write(out / "table.md", markdown(method, rows))
    return result


def compare(method: str, protocol: Protocol, legs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per published number: the measured value (percent) of the leg that evaluates its dataset
    with its shots, or None where the leg did not run or the metric is undefined."""
    rows = []
    for number in published(method):
        measured = None
        for leg in protocol.legs:
            if leg.name not in legs or leg.evaluate != number["dataset"]:
                continue
            if leg.train_shots not in (None, number["shots"]) or (
                leg.eval_shots and number["shots"] not in leg.eval_shots
            ):
                continue
            key = _dataset_key(legs[leg.name], number["shots"] if leg.eval_shots else None)
            value = legs[leg.name]["datasets"].get(key, {}).get("mean", {}).get(number["metric"])
            measured = None if value is None else round(100 * value, 1)
        rows.append({**number, "measured": measured})
    return rows


def markdown(method: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as a markdown table (percent), followed by the citations."""
    lines = [
        f"# `anomalens reproduce {method}`: measured vs published",
        "",
        "measured: this run; published: the paper's own number (cited per row), not measured here.",
        "",
        "| dataset | K / N | metric | measured | published (paper) | source |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        shots = "—" if r["shots"] is None else str(r["shots"])
        measured = "not run" if r["measured"] is None else f"{r['measured']:.1f}"
        source = f"paper {r['paper']} {r['table']}, {r['column']} (trained on {r['trained_on']})"
        lines.append(
            f"| {r['dataset']} | {shots} | {r['metric']} | {measured} | {r['value']:.1f} | {source} |"
        )
    citations = sorted({(r["paper"], r["citation"]) for r in rows})
    return "\n".join([*lines, "", *(f"* paper {p}: {c}" for p, c in citations), ""])


# ---------------------------------------------------------------------- legs
def _train_leg(
    protocol: Protocol,
    leg: Leg,
    root: Path,
    run_dir: Path,
    backbone: str | None,
    pretrained: str | None,
    options: Mapping[str, Any] | None,
    train_options: Mapping[str, Any] | None,
    device: str,
    seed: int,
    progress: bool,
) -> Method:
    """Train the protocol's method on `leg.train` with the recipe; the user's overrides win."""
    from anomalens.training import train

    return train(
        protocol.method,
        [_spec(leg.train, root)],
        run_dir,
        recipe=protocol.recipe,
        shots=leg.train_shots,
        backbone=backbone,
        pretrained=pretrained,
        options={**protocol.options, **(options or {})},
        device=device,
        seed=seed,
        progress=progress,
        **(train_options or {}),
    ).method


def _evaluate_leg(
    protocol: Protocol, leg: Leg, model: Method, root: Path, batch_size: int, seed: int, progress: bool
) -> dict:
    from anomalens.protocols import run_protocol

    return run_protocol(
        "generalist" if leg.eval_shots else "zero-shot",
        model,
        _spec(leg.evaluate, root),
        shots=list(leg.eval_shots) or None,
        seeds=protocol.seeds if leg.eval_shots else None,
        support_seed=seed,
        batch_size=batch_size,
        eval_resolution=EVAL_RESOLUTION,
        progress=progress,
    )


def _spec(dataset: str, root: Path) -> str:
    return DATASETS[dataset].format(root=root)


def _dataset_key(results: Mapping[str, Any], shots: int | None) -> str | None:
    """The results-document key of the leg's one dataset (``<name>/<K>-shot`` for generalist runs)."""
    keys = list(results["datasets"])
    if shots is None:
        return keys[0] if len(keys) == 1 else None
    return next((k for k in keys if k.endswith(f"/{shots}-shot")), None)


def _weights_by_leg(
    protocol: Protocol, weights: Mapping[str, str] | Sequence[str] | None
) -> dict[Leg, str] | None:
    """{leg: checkpoint} from {training dataset: file} (or "DATASET=FILE" strings) or one file; None =
    train every leg."""
    if not weights:
        return None
    pairs = [] if isinstance(weights, Mapping) else [w.partition("=") for w in weights]
    if pairs and all(sep for _, sep, _ in pairs):
        weights = {k: v for k, _, v in pairs}
    trained_on = {leg.train for leg in protocol.legs}
    if not isinstance(weights, Mapping):
        if len(weights) != 1 or len(trained_on) != 1:
            need = ", ".join(sorted(trained_on))
            raise ValueError(
                f"--weights: give DATASET=FILE per training dataset ({need}), got {list(weights)}"
            )
        weights = {next(iter(trained_on)): weights[0]}
    unknown = set(weights) - trained_on
    if unknown:
        raise ValueError(
            f"--weights: no leg trains on {', '.join(sorted(unknown))}; "
            f"legs train on {', '.join(sorted(trained_on))}"
        )
    for path in weights.values():
        if not Path(path).is_file():
            raise FileNotFoundError(f"--weights: file not found: {path}")
    return {leg: weights[leg.train] for leg in protocol.legs if leg.train in weights}
