"""Named evaluation protocols: which support sets a trained (or training-free) method is evaluated with.

* "zero-shot": no support images; the method was trained elsewhere (e.g. on VisA, evaluated on MVTec).
* "fewshot": one K and one support seed; the K normal images per class come from the train split.
* "generalist": InCTRLv2 §5.1.1 — every K in `shots` (default 1, 2, 4) × `seeds` independent support
  draws (default 3); metrics are averaged over the draws and their standard deviation reported. The
  datasets of the result are named "<dataset>/<K>-shot" and every draw's support files are recorded.

Training is not part of a protocol: train first (`anomalens train`), then evaluate the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anomalens.data.types import Dataset
    from anomalens.methods.base import Method

PROTOCOLS = ("zero-shot", "fewshot", "generalist")
GENERALIST_SHOTS = (1, 2, 4)
GENERALIST_SEEDS = 3


def run_protocol(
    protocol: str | None,
    method: Method,
    dataset_or_specs: str | Dataset | Sequence[str | Dataset],
    *,
    shots: Sequence[int] | None = None,
    seeds: int | None = None,
    support_seed: int = 0,
    **eval_options: Any,
) -> dict:
    """Run a named protocol and return one results document (DESIGN §3.4).

    protocol: None = "zero-shot" without `shots`, "fewshot" for one K and at most one seed, else
    "generalist". shots: K values ("fewshot" takes exactly one); seeds: number of support draws, seeded
    `support_seed`, `support_seed + 1`, ... ("generalist" only); eval_options go to `evaluate_method`.
    """
    from anomalens.evaluation import evaluate_method

    if protocol is None:
        one_draw = len(shots or []) == 1 and seeds in (None, 1)
        protocol = "zero-shot" if not shots else "fewshot" if one_draw else "generalist"
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    shots = list(shots or [])
    if protocol == "zero-shot":
        if shots or seeds not in (None, 1):
            raise ValueError("the zero-shot protocol takes no --shots/--seeds")
        return evaluate_method(method, dataset_or_specs, protocol=protocol, **eval_options)
    if protocol == "fewshot":
        if len(shots) != 1 or seeds not in (None, 1):
            raise ValueError(
                "the fewshot protocol takes exactly one K (--shots K) and one seed (--support-seed)"
            )
        return evaluate_method(
            method,
            dataset_or_specs,
            shots=shots[0],
            support_seed=support_seed,
            protocol=protocol,
            **eval_options,
        )
    shots = shots or list(GENERALIST_SHOTS)
    n_seeds = GENERALIST_SEEDS if seeds is None else seeds
    if n_seeds < 1 or any(k < 1 for k in shots):
        raise ValueError(
            f"generalist protocol needs K >= 1 and seeds >= 1, got shots={shots} seeds={n_seeds}"
        )
    draws = [support_seed + i for i in range(n_seeds)]
    runs = {
        (k, seed): evaluate_method(
            method, dataset_or_specs, shots=k, support_seed=seed, protocol=protocol, **eval_options
        )
        for k in shots
        for seed in draws
    }
    return average_runs(runs, shots, draws)


def run_eval(
    method: Method,
    dataset_or_specs: str | Dataset | Sequence[str | Dataset],
    out: str | os.PathLike,
    *,
    protocol: str | None = None,
    report: bool = False,
    **options: Any,
) -> dict:
    """`run_protocol`, then ``results.json`` and ``results.md`` in `out` and, with `report`,
    ``report.html``: heatmaps of the best and worst cases of each class (of the first K and draw)."""
    from anomalens.evaluation import ClassResult, main_process, write_results
    from anomalens.viz import ClassReport, class_report, html_report

    collected: dict[tuple[str, str], ClassReport] = {}

    def collect(r: ClassResult) -> None:  # the report shows the first run of each class (first K, draw)
        if (r.dataset_name, r.class_name) not in collected:
            collected[(r.dataset_name, r.class_name)] = class_report(r, threshold=method.threshold)

    on_class = collect if report else None
    results = run_protocol(protocol, method, dataset_or_specs, on_class=on_class, **options)
    if not main_process():  # under torchrun every process holds the results; rank 0 writes them
        return results
    write_results(results, out)
    if report:
        title = f"anomalens eval: {method.name}, {results['protocol']}"
        if results["protocol"] == "generalist":
            title += f" (images of the first run: K={results['shots'][0]}, seed {results['seeds'][0]})"
        html_report(list(collected.values()), Path(out) / "report.html", title=title)
    return results


def average_runs(runs: dict[tuple[int, int], dict], shots: Sequence[int], seeds: Sequence[int]) -> dict:
    """Combine {(K, seed): results} into one document: per K and dataset, metrics averaged over seeds
    (per class, and the class mean), with the standard deviation over seeds of the class mean."""
    from anomalens.evaluation import mean_over_classes, timing

    first = runs[(shots[0], seeds[0])]
    combined: dict[str, Any] = {
        **{
            k: v
            for k, v in first.items()
            if k not in ("datasets", "support_files", "timing", "shots", "seed")
        },
        "seed": seeds[0],
        "seeds": list(seeds),
        "shots": list(shots),
        "support_files": {},
        "datasets": {},
    }
    for k in shots:
        for name in first["datasets"]:
            key = f"{name}/{k}-shot"
            draws = [runs[(k, s)]["datasets"][name] for s in seeds]
            per_class = {
                cls: _mean_dicts([d["classes"][cls] for d in draws])
                for cls in first["datasets"][name]["classes"]
            }
            entry = {"classes": per_class, **mean_over_classes(per_class)}
            entry["std"] = _std_dicts([d["mean"] for d in draws])
            combined["datasets"][key] = entry
            combined["support_files"][key] = {str(s): runs[(k, s)]["support_files"][name] for s in seeds}
    timings = [r["timing"] for r in runs.values()]
    images, seconds = sum(t["images"] for t in timings), sum(t["seconds"] for t in timings)
    combined["timing"] = timing(images, seconds, timings[0]["device"])
    return combined


def _mean_dicts(dicts: list[dict[str, float | None]]) -> dict[str, float | None]:
    return {m: _stat(np.mean, [d.get(m) for d in dicts]) for m in dicts[0]}


def _std_dicts(dicts: list[dict[str, float | None]]) -> dict[str, float | None]:
    return {m: _stat(np.std, [d.get(m) for d in dicts]) for m in dicts[0]}


def _stat(fn: Any, values: list[float | None]) -> float | None:
    """fn over the draws; None when the metric is undefined in any draw (same images every draw)."""
    return None if any(v is None for v in values) else float(fn(values))
