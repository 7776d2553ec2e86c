"""The typed contracts between methods, the training engine and evaluation: `Prediction` (what
`Method.predict` returns), `BatchPrediction` (what a method's `forward_batch` returns), and the training
contract `TrainConfig`, `TrainBatch`, `Stage` with the schedule overrides (`override_schedule`).

This module sits below `methods/` and `engine/`: both import it, and it imports neither, so the model
library and the training loop share their types without importing each other (`Method.fit` imports the
engine on first use; the engine sees a method only through these types).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from anomalens.data.types import Dataset, Sample

# Parameters under these prefixes belong to frozen backbones: never trained, never saved.
FROZEN_PREFIXES = ("backbone.", "dino.")


@dataclass
class Prediction:
    """Scores (B,) float32, higher = more anomalous, and maps (B,H,W) float32 at each input's own
    resolution (a list when the inputs differ in size)."""

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray]
    # Per-image side outputs (name -> (B,) array) that a method's `set_scores` needs, e.g. AA-CLIP's
    # image-branch term for its per-class min-max table score.
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def concat(cls, parts: Sequence[Prediction]) -> Prediction:
        """The predictions of ``parts`` one after the other; maps are stacked when they share one size.

        Every part must carry the same extras."""
        if not parts:
            raise ValueError("Prediction.concat: no predictions to concatenate")
        maps = [m for p in parts for m in p.maps]
        stacked = np.stack(maps) if len({m.shape for m in maps}) == 1 else maps
        extras = {k: np.concatenate([p.extras[k] for p in parts]) for k in parts[0].extras}
        return cls(np.concatenate([p.scores for p in parts]).astype(np.float32), stacked, extras)


@dataclass
class BatchPrediction:
    """What `Method.forward_batch` returns for B preprocessed images (tensors on the model's device)."""

    scores: torch.Tensor  # (B,) higher = more anomalous
    maps: torch.Tensor  # (B, h, w) at any model resolution; `predict` resizes them to each input
    # Per-image side outputs, name -> (B,), returned in `Prediction.extras` (documented per method).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training stage; every field can be overridden from `fit`/CLI.

    A method's defaults are its *schedule*: a frozen dataclass with one `TrainConfig` field per stage
    (``Method.schedule_class``, next to its config class). `override_schedule` applies overrides to it
    (a named recipe of `anomalens.recipes` is such overrides); the model file and results record the
    schedule a model was trained with.
    """

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: str | None = None  # None | multistep | cosine
    milestones: tuple[int, ...] = ()  # in iterations for multistep
    gamma: float = 0.5
    grad_accum: int = 1
    max_steps_per_epoch: int | None = None
    amp: bool = False  # bf16/fp16 autocast on CUDA, opt-in (`--amp`); the four sources all train in fp32
    augment: bool = False
    # "shuffle": every image once per epoch; "balanced": batches of batch_size // 2 normal + the rest
    # anomalous images, drawn from endless per-label permutations (InCTRL's BalancedBatchSampler), with
    # max_steps_per_epoch optimiser steps per epoch (default: as many as "shuffle" would give).
    sampler: str = "shuffle"


@dataclass(frozen=True)
class TrainProgress:
    """Where training stands when a stage's loss is called (given to losses of stages with
    ``needs_progress``): ``step`` optimiser steps of this stage are done, of ``total_steps``."""

    stage: str
    epoch: int  # 0-based epoch of the stage
    epochs: int
    step: int
    total_steps: int

    @property
    def fraction(self) -> float:
        """Share of the stage's optimiser steps already taken, in [0, 1]."""
        return min(1.0, self.step / self.total_steps) if self.total_steps > 0 else 1.0


@dataclass
class TrainBatch:
    """A collated training batch at the model's input resolution S."""

    images: torch.Tensor  # (B, 3, S, S) normalised
    masks: torch.Tensor  # (B, S, S) float 0/1 (zeros where no mask)
    labels: torch.Tensor  # (B,) long
    has_mask: torch.Tensor  # (B,) bool: pixel supervision available
    class_names: list[str]
    subject_masks: torch.Tensor | None = None  # (B, S, S) float, contextual datasets
    support: torch.Tensor | None = None  # (B, K, 3, S, S) normal support per query (few-shot training)

    def to(self, device: torch.device | str) -> TrainBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return dataclasses.replace(
            self,
            images=move(self.images),
            masks=move(self.masks),
            labels=move(self.labels),
            has_mask=move(self.has_mask),
            subject_masks=move(self.subject_masks),
            support=move(self.support),
        )


@dataclass
class Stage:
    """One training stage: which parameters learn, with which loss, on which data."""

    name: str
    parameters: Callable[[], Iterable[nn.Parameter]]
    loss: Callable[[TrainBatch], dict[str, torch.Tensor]]  # must hold "loss"; others are logged
    config: TrainConfig
    select: Callable[[Dataset], Dataset] | None = None  # e.g. normal images only (InCTRLv2 OASL)
    collate: Callable[[list[Sample], bool], TrainBatch] | None = None  # default: Method.collate
    # Called with `train_method`'s support_data (default: the training data) before `select`: the
    # normal images a few-shot method draws per-query supports from.
    support: Callable[[Dataset], None] | None = None
    needs_progress: bool = False  # loss(batch, progress: TrainProgress) instead of loss(batch)


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def override_configs(
    configs: Mapping[str, TrainConfig], overrides: Mapping[str, Any]
) -> dict[str, TrainConfig]:
    """`configs` (stage name → `TrainConfig`) with `overrides` applied.

    ``{"lr": 1e-4}`` applies to every stage, ``{"image.lr": 1e-4}`` to stage "image" only (and wins over
    the former). Unknown fields or stages are a ValueError naming them. Lists become tuples where the
    field is a tuple (values coming from JSON or a CLI) and ints become floats where it is a float.
    """
    names = list(configs)
    common: dict[str, Any] = {}
    per_stage: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in overrides.items():
        stage, dot, name = key.rpartition(".")
        if name not in TRAIN_FIELDS:
            raise ValueError(
                f"unknown training option {key!r}; valid: {', '.join(TRAIN_FIELDS)} "
                f"(for one stage: <stage>.<option>, stages: {', '.join(names)})"
            )
        if dot and stage not in per_stage:
            raise ValueError(f"training option {key!r}: no stage {stage!r}; stages: {', '.join(names)}")
        (per_stage[stage] if dot else common)[name] = value
    result = {}
    for stage, config in configs.items():
        changes = {**common, **per_stage[stage]}
        result[stage] = dataclasses.replace(
            config, **{k: _coerce(getattr(config, k), v) for k, v in changes.items()}
        )
    return result


def override_schedule(schedule: Any, overrides: Mapping[str, Any]) -> Any:
    """A method's schedule dataclass with `overrides` applied (`override_configs`' forms)."""
    configs = {f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedule)}
    return dataclasses.replace(schedule, **override_configs(configs, overrides))


def _coerce(default: Any, value: Any) -> Any:
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
