"""Named training recipes: the settings of a method's released code (``official``) or of its paper.

A recipe fixes everything that decides a trained result besides the data itself: method options
(resolution, compatibility switches), per-stage training settings (epochs, lr, betas, batch size,
sampler, precision, schedule), the split of the auxiliary dataset it trains on, and what ``--shots N``
means. A recipe's training settings are named overrides of the method's schedule (its per-stage
`TrainConfig` defaults, ``Method.schedule_class``): `apply` writes them into ``method.schedule``, and
the user's own `fit` overrides apply on top, so they still win. `anomalens train --recipe NAME` applies
one and records it in the model file and in evaluation results (``describe()["recipe"]``, next to
``describe()["schedule"]``). docs/recipes.md has the table of
paper vs official code vs recipe per method; each entry below cites where its values come from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalens.methods.base import Method

RECIPE_NAMES = ("official", "paper")


@dataclass(frozen=True)
class Recipe:
    """One named recipe of one method.

    Attributes:
        method: registered method name.
        name: "official" (the released training code) or "paper".
        source: where the values come from (file:line at a commit, or paper section).
        options: method options (`create(**options)`).
        train: overrides of the method's schedule (a TrainConfig field for every stage, or
            ``"stage.field"`` for one; `contracts.override_schedule`).
        auxiliary: the auxiliary dataset the paper's main table trains on, with its split.
        split: split of the auxiliary dataset to train on.
        shots: what ``--shots N`` selects for this method (`data.shot_subset` semantics).
    """

    method: str
    name: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    auxiliary: str = ""
    split: str = "test"
    shots: str = "per_label"

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the recipe (stored in model files and results)."""
        return asdict(self)


_AA_CLIP_TRAIN = {
    "text.epochs": 5,
    "text.batch_size": 16,
    "text.lr": 1e-5,
    "image.epochs": 20,
    "image.batch_size": 2,
    "image.lr": 5e-4,
    "betas": (0.5, 0.999),
    "optimizer": "adam",
    "amp": False,
}

RECIPES: dict[str, dict[str, Recipe]] = {
    "aa-clip": {
        "official": Recipe(
            "aa-clip",
            "official",
            "Mwxinnn/AA-CLIP@53db195 train.py:198-203,263-274 (Adam(0.5, 0.999); stage 2 MultiStepLR "
            "16k/32k, gamma 0.5, per iteration); dataset/__init__.py:13-103 (VisA test split)",
            options={"image_size": 518},
            train={**_AA_CLIP_TRAIN, "image.schedule": "multistep", "image.milestones": (16000, 32000)},
            auxiliary="VisA test split (evaluate on MVTec AD), and the reverse",
            split="test",
            shots="per_class",
        ),
        "paper": Recipe(
            "aa-clip",
            "paper",
            "paper 002 §4.1 (518 px, 5 epochs at 1e-5, 20 epochs at 5e-4, Adam; 2-shot = one normal + one "
            "anomalous per class, 1:1); supplementary A.3 (betas (0.5, 0.999), batch 16 / 2)",
            options={"image_size": 518},
            train={**_AA_CLIP_TRAIN, "image.schedule": "multistep", "image.milestones": (16000, 32000)},
            auxiliary="VisA test split (evaluate on MVTec AD), and the reverse",
            split="test",
            shots="per_class",
        ),
    },
    "crane": {
        "official": Recipe(
            "crane",
            "official",
            "AlirezaSalehy/Crane@39181f9 train.py:68,184-193 (Adam(0.6, 0.999), lr 1e-3, 5 epochs, batch 8, "
            "518 px); reproduce.sh:23-37 (train on MVTec AD, test on VisA, and the reverse)",
            options={"image_size": 518},
            train={"epochs": 5, "batch_size": 8, "lr": 1e-3, "betas": (0.6, 0.999), "amp": False},
            auxiliary="MVTec AD test split (evaluate on VisA and the others), VisA test split for MVTec AD",
            split="test",
        ),
        "paper": Recipe(
            "crane",
            "paper",
            "paper 003 App. A (ViT-L/14@336 at 518 px, 12 context tokens, 4 deep tokens in 9 layers); "
            "§5 ablations: 5 epochs; optimiser and lr not stated: the official code's",
            options={"image_size": 518},
            train={"epochs": 5, "batch_size": 8, "lr": 1e-3, "betas": (0.6, 0.999), "amp": False},
            auxiliary="MVTec AD test split (evaluate on VisA and the others), VisA test split for MVTec AD",
            split="test",
        ),
    },
    "inctrl": {
        "official": Recipe(
            "inctrl",
            "official",
            "mala-lab/InCTRL@cc535d0 engine_IC.py:188,201 (AdamW lr 1e-3, default weight decay 0.01); "
            "main.py:81 (100 steps per epoch); datasets/new_utlis.py:10-56 (8 normal + 8 anomalous per "
            "batch); defaults.py (10 epochs, batch 16, shot 2)",
            options={"train_shots": 2},
            train={
                "epochs": 10,
                "batch_size": 16,
                "lr": 1e-3,
                "optimizer": "adamw",
                "betas": (0.9, 0.999),
                "weight_decay": 0.01,
                "sampler": "balanced",
                "max_steps_per_epoch": 100,
                "amp": False,
            },
            auxiliary="MVTec AD, all of it (normal list train/good + test/good, outlier list test "
            "defects); evaluate on the other datasets with K = 2, 4, 8 supports",
            split="all",
            shots="support",
        ),
        "paper": Recipe(
            "inctrl",
            "paper",
            "paper 001 §5.1.3 (Adam, lr 1e-3, 10 epochs, batch 48); sampler and steps not stated: the "
            "official balanced batches",
            options={"train_shots": 2},
            train={
                "epochs": 10,
                "batch_size": 48,
                "lr": 1e-3,
                "optimizer": "adam",
                "betas": (0.9, 0.999),
                "weight_decay": 0.0,
                "sampler": "balanced",
                "max_steps_per_epoch": 100,
                "amp": False,
            },
            auxiliary="MVTec AD, all of it; evaluate on the other datasets with K = 1, 2, 4 supports",
            split="all",
            shots="support",
        ),
    },
    "inctrlv2": {
        "paper": Recipe(
            "inctrlv2",
            "paper",
            "paper 001 §5.1.3 (Adam, lr 1e-3, 10 epochs, batch 48); §5.1.1 (DASL on the auxiliary test "
            "split, OASL on its normal train images); no official code exists",
            train={"epochs": 10, "batch_size": 48, "lr": 1e-3, "optimizer": "adam", "amp": False},
            auxiliary="MVTec AD, all of it; evaluate on the other datasets with K = 1, 2, 4 supports",
            split="all",
            shots="support",
        ),
    },
    "core-clip": {
        "paper": Recipe(
            "core-clip",
            "paper",
            "paper 000 Table 7 (text: 5 epochs, batch 16, lr 2e-5; image: 20 epochs, batch 8, lr 3e-4, "
            "MultiStepLR 16k/32k, gamma 0.5; Adam(0.5, 0.999)); B.1 (no mixed precision); A.10 (N normal "
            "+ N anomalous per class); no official code exists",
            train={
                "text.epochs": 5,
                "text.batch_size": 16,
                "text.lr": 2e-5,
                "image.epochs": 20,
                "image.batch_size": 8,
                "image.lr": 3e-4,
                "image.schedule": "multistep",
                "image.milestones": (16000, 32000),
                "betas": (0.5, 0.999),
                "amp": False,
            },
            auxiliary="CAAD-SS train split, N-shot (evaluate on CAAD-CC)",
            split="train",
            shots="per_label",
        ),
    },
}


def recipe(method: str, name: str) -> Recipe:
    """The recipe `name` of `method`; a ValueError names the recipes that exist."""
    available = RECIPES.get(method, {})
    if name not in available:
        have = ", ".join(available) or "none"
        raise ValueError(f"no recipe {name!r} for {method}; available: {have}")
    return available[name]


def apply(method: Method, recipe: Recipe) -> None:
    """Record `recipe` on `method` and apply its training overrides to ``method.schedule`` (the options
    are the caller's to pass to `create`); overrides given to `fit` later apply on top."""
    from anomalens.contracts import override_schedule  # imports torch: not at `anomalens --help`

    method.recipe = recipe.describe()
    method.schedule = override_schedule(method.schedule, recipe.train)
