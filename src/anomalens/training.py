"""Training from dataset specs: the one function behind `anomalens train` and each training leg of
`anomalens reproduce` (a recipe, the training subset, the support set of few-shot methods, then `fit`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalens.data.types import Dataset
    from anomalens.methods.base import Method


@dataclasses.dataclass
class TrainRun:
    """What `train` built: the trained method, the dataset it was trained on, and `fit`'s history."""

    method: Method
    dataset: Dataset
    history: Any


def train(
    method: str,
    data: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    recipe: str | None = None,
    shots: int | str | None = None,
    normal_only: bool = False,
    backbone: str | None = None,
    pretrained: str | None = "default",
    options: Mapping[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
    **train_options: Any,
) -> TrainRun:
    """Create `method` and train it on the datasets `data` (specs, concatenated) into `out_dir`.

    recipe: a named recipe of the method (docs/recipes.md): its method options come first (`options`
        win) and its schedule is applied (the `fit` overrides in `train_options` win).
    split: default the recipe's, else "test" (as the papers). shots: the training subset per class in
        the method's meaning (`data.shot_subset`; None or "full": all). normal_only: keep normal images.
    Few-shot methods draw training supports from every normal image of `data` (split "all", the
    official InCTRL normal list), whatever split the queries come from.
    train_options: `anomalens.engine.train_method`'s options (stages, resume, progress, ...) and
        TrainConfig overrides (``epochs=1``, ``**{"image.lr": 1e-4}``).
    """
    import anomalens.data as al_data
    from anomalens.methods import create
    from anomalens.recipes import apply as apply_recipe
    from anomalens.recipes import recipe as named_recipe

    chosen = named_recipe(method, recipe) if recipe else None
    split = split or (chosen.split if chosen is not None else "test")
    dataset = al_data.concat_datasets([al_data.load(spec, split, classes) for spec in data])
    given = {**(chosen.options if chosen is not None else {}), **(options or {})}
    model = create(method, backbone=backbone, pretrained=pretrained, device=device, **given)
    if chosen is not None:
        apply_recipe(model, chosen)
    dataset = al_data.shot_subset(dataset, shots, model.shot_semantics, seed=seed)
    if normal_only:
        dataset = al_data.normal_only(dataset)
    support = (
        al_data.concat_datasets([al_data.load(spec, "all", classes) for spec in data])
        if model.needs_support
        else None
    )
    history = model.fit(dataset, out_dir=out_dir, seed=seed, support_data=support, **train_options)
    return TrainRun(model, dataset, history)
