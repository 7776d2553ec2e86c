"""The training loop: a method's stages, in order, with their optimisers, schedules, AMP and checkpoints.

Terms used in logs and options: a *micro-batch* is what `collate` returns (``batch_size`` samples); an
*optimiser step* (a "step", an "iteration") applies the gradients of ``grad_accum`` micro-batches. The
learning-rate schedule, ``milestones``, ``max_steps_per_epoch``, ``log_every`` and the ``step`` of the
logs all count optimiser steps, from 0 at the start of each stage.

Determinism: each epoch's sample order is a permutation drawn from a generator seeded by
(seed, stage, epoch) alone (`torch.utils.data.DistributedSampler`, also with one process), so it does
not depend on the batch size, on what ran before, or on whether the run was resumed. Global RNGs are
seeded with ``seed + rank`` at the start and saved at every checkpoint, so augmentations and dropout
continue identically after a resume: on CPU a resumed run is bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import random
import sys
import time
import warnings
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from anomalens.contracts import (
    FROZEN_PREFIXES,
    Stage,
    TrainBatch,
    TrainConfig,
    TrainProgress,
    override_configs,
)
from anomalens.data.types import Dataset, Sample
from anomalens.engine import checkpoint, distributed
from anomalens.engine.sampling import BalancedBatchSampler

if TYPE_CHECKING:  # the engine sees a method through the training contract; it never imports methods/
    from anomalens.methods.base import Method

MODEL_FILE = "model.anomalens"
RESUME_FILE = "resume.safetensors"
LOG_FILE = "train_log.jsonl"
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = (None, "multistep", "cosine")
SAMPLERS = ("shuffle", "balanced")

History = dict[str, list[dict[str, float]]]


class NonFiniteError(FloatingPointError):
    """The loss (or the weights) became NaN/inf; raised before anything is updated or saved."""


# ---------------------------------------------------------------------- configuration
def resolve_configs(stages: Sequence[Stage], overrides: Mapping[str, Any]) -> dict[str, TrainConfig]:
    """Each stage's `TrainConfig` with `overrides` applied (`contracts.override_configs`), validated."""
    configs = override_configs({s.name: s.config for s in stages}, overrides)
    return {name: _validated(name, config) for name, config in configs.items()}


def _validated(stage: str, c: TrainConfig) -> TrainConfig:
    problems = [
        message
        for failed, message in (
            (c.optimizer not in OPTIMIZERS, f"optimizer {c.optimizer!r} is not one of {OPTIMIZERS}"),
            (c.schedule not in SCHEDULES, f"schedule {c.schedule!r} is not one of {SCHEDULES}"),
            (c.sampler not in SAMPLERS, f"sampler {c.sampler!r} is not one of {SAMPLERS}"),
            (
                c.sampler == "balanced" and c.batch_size < 2,
                f"sampler 'balanced' needs batch_size >= 2, got {c.batch_size}",
            ),
            (c.epochs < 0, f"epochs must be >= 0, got {c.epochs}"),
            (c.batch_size < 1, f"batch_size must be >= 1, got {c.batch_size}"),
            (c.grad_accum < 1, f"grad_accum must be >= 1, got {c.grad_accum}"),
            (c.lr < 0, f"lr must be >= 0, got {c.lr}"),
            (len(c.betas) != 2, f"betas must be two numbers, got {c.betas}"),
            (
                c.max_steps_per_epoch is not None and c.max_steps_per_epoch < 1,
                f"max_steps_per_epoch must be None or >= 1, got {c.max_steps_per_epoch}",
            ),
        )
        if failed
    ]
    if problems:
        raise ValueError(f"stage {stage!r}: " + "; ".join(problems))
    return c


def scheduled_lr(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of the optimiser step with 0-based index `step` in a stage of `total_steps` steps.

    multistep: ``lr · gamma^(number of milestones <= step)`` (torch's MultiStepLR stepped once per
    iteration); cosine: ``lr · (1 + cos(π · step / total_steps)) / 2``, from lr down towards 0.
    """
    if config.schedule == "multistep":
        return config.lr * config.gamma ** bisect_right(sorted(config.milestones), step)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    return config.lr


def build_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam / AdamW with ``betas`` and ``weight_decay``, or plain SGD (no momentum: TrainConfig has none)."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


def derive_seed(*parts: object) -> int:
    """A stable 48-bit seed from `parts` (Python's own `hash` of strings changes between processes)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:6], "little")


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- data
class _Samples(torch.utils.data.Dataset):
    """Index → `Sample` view of a `Dataset`, for a torch DataLoader."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        return self.dataset[index]


class _Collate:
    """``collate(samples, augment)`` as a one-argument, picklable collate_fn (it runs in the workers)."""

    def __init__(self, collate: Callable[[list[Sample], bool], TrainBatch], augment: bool):
        self.collate = collate
        self.augment = augment

    def __call__(self, samples: list[Sample]) -> TrainBatch:
        return self.collate(samples, self.augment)


# ---------------------------------------------------------------------- the loop
def train_method(
    method: Method,
    dataset: Dataset,
    *,
    stages: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    num_workers: int = 0,
    log_every: int = 10,
    support_data: Dataset | None = None,
    **overrides: Any,
) -> History:
    """Train `method`'s stages (`method.training_stages()`, in order; or only those named in `stages`).

    overrides: TrainConfig fields for every stage (``epochs=5, lr=1e-4``) or for one (``**{"image.lr":
    1e-4}``); anything else is a ValueError. out_dir: where ``model.anomalens`` (the method, via
    `Method.save`), ``resume.safetensors`` (optimiser, RNG and position; see `checkpoint`) and
    ``train_log.jsonl`` go; both files are replaced atomically at the end of every epoch. resume: continue
    from ``out_dir/resume.safetensors`` at the epoch after the last completed one (weights, optimiser,
    AMP scaler, RNG and position restored; stages before the saved one are not run again); without that
    file, start from scratch with a warning. num_workers: DataLoader worker processes that read and
    collate samples. seed: fixes the data order and seeds python/numpy/torch's global RNGs (with
    ``seed + rank``). support_data: the normal images few-shot methods draw per-query supports from
    (`Stage.support`; default `dataset`), e.g. a dataset's train and test normals whatever split the
    queries come from. Under torchrun the work is data-parallel (see `distributed`).

    The log has one JSON line per `log_every` optimiser steps (means over them) and one per epoch:
    ``{"event", "stage", "epoch", "step", <each loss key>, "lr", "seconds"}`` (seconds since the call began).
    Returns ``{stage: [{"epoch", "loss", <other loss keys>, "lr", "steps", "seconds"}, ...]}`` with loss
    keys averaged over the epoch's steps (over all processes) and seconds = the epoch's duration.
    A non-finite loss raises `NonFiniteError` naming the stage, epoch and step, before the weights are
    updated, so the last checkpoint stays the last good one. The method is left in eval mode.
    """
    all_stages = method.training_stages()
    if not all_stages:
        raise ValueError(f"method {method.name!r} has nothing to train")
    names = [s.name for s in all_stages]
    if isinstance(stages, str):
        stages = [stages]
    unknown = [s for s in stages or () if s not in names]
    if unknown:
        raise ValueError(
            f"unknown stage(s) {', '.join(map(repr, unknown))}; {method.name!r} has: {', '.join(names)}"
        )
    configs = resolve_configs(all_stages, overrides)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the folder of the run to continue)")
    if log_every < 1 or num_workers < 0:
        raise ValueError(f"log_every must be >= 1 and num_workers >= 0, got {log_every} and {num_workers}")

    if distributed.setup() and method.device.type == "cuda":
        method.to(torch.device("cuda", torch.cuda.current_device()))
    run = _Run(
        method,
        dataset,
        Path(out_dir) if out_dir is not None else None,
        seed,
        progress,
        num_workers,
        log_every,
        support_data if support_data is not None else dataset,
    )
    try:
        state = run.load_resume() if resume else None
        if state is None:
            seed_everything(seed + distributed.rank())
        plan = [(i, s) for i, s in enumerate(all_stages) if stages is None or s.name in stages]
        if state is not None:
            position = [i for i, _ in plan]
            if state.stage_index not in position:
                raise ValueError(
                    f"resume: {run.out}/{RESUME_FILE} stopped in stage {state.stage!r}, which is "
                    f"not among the stages to run ({', '.join(s.name for _, s in plan)})"
                )
            plan = plan[position.index(state.stage_index) :]
        if method.schedule is not None:  # the model file and results record what this run trains with
            ran = {s.name: configs[s.name] for _, s in plan}
            method.schedule = dataclasses.replace(method.schedule, **ran)
        run.log(
            {
                "event": "start",
                "resume": state is not None,
                "seed": seed,
                "world_size": distributed.world_size(),
                "stages": [s.name for _, s in plan],
                "configs": {s.name: dataclasses.asdict(configs[s.name]) for _, s in plan},
            }
        )
        for index, stage in plan:
            resumed = state if state is not None and state.stage_index == index else None
            run.train_stage(index, stage, configs[stage.name], resumed)
        if run.out is not None and distributed.is_main():
            method.save(run.out / MODEL_FILE)
        distributed.barrier()
    finally:
        run.close()
        method.eval()
    return run.history


class _Run:
    """The state of one `train_method` call shared by its stages: where to write, history, clock."""

    def __init__(
        self,
        method: Method,
        dataset: Dataset,
        out: Path | None,
        seed: int,
        progress: bool,
        num_workers: int,
        log_every: int,
        support_data: Dataset,
    ):
        self.method = method
        self.dataset = dataset
        self.support_data = support_data
        self.out = out
        self.seed = seed
        self.num_workers = num_workers
        self.log_every = log_every
        self.device = method.device
        self.main = distributed.is_main()
        self.show_progress = progress and self.main and sys.stderr.isatty()
        self.history: History = {}
        self.start = time.perf_counter()
        self._log: IO[str] | None = None
        if out is not None and self.main:
            out.mkdir(parents=True, exist_ok=True)
            self._log = open(out / LOG_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            clean = {
                k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()
            }
            self._log.write(json.dumps(clean) + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # ------------------------------------------------------------------ resume
    def identity(self) -> dict[str, Any]:
        desc = self.method.describe()
        return {k: desc[k] for k in ("method", "backbone", "options")}

    def load_resume(self) -> checkpoint.ResumeState | None:
        """Read out/resume.safetensors into the method and the RNGs; None when there is none yet."""
        assert self.out is not None
        path = self.out / RESUME_FILE
        if not path.is_file():
            warnings.warn(f"resume: {path} does not exist yet; training from scratch", stacklevel=3)
            return None
        state = checkpoint.read_resume(path)
        if state.identity != self.identity():
            raise ValueError(
                f"resume: {path} was written by {state.identity}, not by this method "
                f"({self.identity()}); use another out_dir or resume=False"
            )
        missing, unexpected = self.method.load_state_dict(state.model, strict=False)
        missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
        if missing or unexpected:
            raise ValueError(
                f"resume: {path} does not match the method (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        rank = distributed.rank()
        if rank in state.rng and state.world_size == distributed.world_size():
            checkpoint.restore_rng(state.rng[rank], self.device)
        else:
            warnings.warn(
                f"resume: {path} was written by {state.world_size} process(es), now "
                f"{distributed.world_size()}; random streams are re-seeded",
                stacklevel=3,
            )
            seed_everything(derive_seed(state.seed, "resume", state.stage, state.epoch, rank) % 2**32)
        self.history = {k: list(v) for k, v in state.history.items()}
        return state

    def save_checkpoint(
        self,
        index: int,
        stage: Stage,
        epoch: int,
        step: int,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> None:
        """model.anomalens and resume.safetensors after `epoch` completed epochs of `stage`."""
        for name, value in self.method.trainable_state().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteError(
                    f"stage {stage.name!r}, epoch {epoch}: weight {name!r} is not finite; "
                    f"the last good checkpoint in {self.out} is kept"
                )
        rngs = distributed.all_gather_objects(checkpoint.capture_rng(self.device))
        if self.main:
            assert self.out is not None
            self.method.save(self.out / MODEL_FILE)
            checkpoint.write_resume(
                self.out / RESUME_FILE,
                checkpoint.ResumeState(
                    stage=stage.name,
                    stage_index=index,
                    epoch=epoch,
                    step=step,
                    identity=self.identity(),
                    model=self.method.trainable_state(),
                    optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(),
                    rng=dict(enumerate(rngs)),
                    history=self.history,
                    seed=self.seed,
                    world_size=distributed.world_size(),
                ),
            )
        distributed.barrier()

    # ------------------------------------------------------------------ stages
    def loader(self, stage: Stage, config: TrainConfig, data: Dataset) -> DataLoader:
        samples = _Samples(data)
        collate = _Collate(stage.collate or self.method.collate, config.augment)
        seed = derive_seed(self.seed, stage.name)
        if config.sampler == "balanced":
            per_process = math.ceil(len(data) / (config.batch_size * distributed.world_size()))
            batches = BalancedBatchSampler(
                [r.label for r in data.records],
                config.batch_size,
                (config.max_steps_per_epoch or per_process) * config.grad_accum,
                seed,
                distributed.rank(),
            )
            return DataLoader(
                samples,
                batch_sampler=batches,
                num_workers=self.num_workers,
                collate_fn=collate,
                generator=torch.Generator(),
            )
        sampler = DistributedSampler(
            samples,
            num_replicas=distributed.world_size(),
            rank=distributed.rank(),
            shuffle=True,
            seed=seed,
        )
        return DataLoader(
            samples,
            batch_size=config.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            generator=torch.Generator(),
        )

    def train_stage(
        self, index: int, stage: Stage, config: TrainConfig, state: checkpoint.ResumeState | None
    ) -> None:
        if stage.support is not None:
            stage.support(self.support_data)
        data = stage.select(self.dataset) if stage.select is not None else self.dataset
        if len(data) == 0:
            raise ValueError(
                f"stage {stage.name!r}: no training samples in {self.dataset.name!r}"
                + (" after its select()" if stage.select is not None else "")
            )
        params = list({id(p): p for p in stage.parameters() if p.requires_grad}.values())
        if not params:
            raise ValueError(f"stage {stage.name!r}: none of its parameters requires grad")
        optimizer = build_optimizer(config, params)
        amp_dtype = None
        if config.amp and self.device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        loader = self.loader(stage, config, data)
        micro_batches = len(loader)
        if config.max_steps_per_epoch is not None:
            micro_batches = min(micro_batches, config.max_steps_per_epoch * config.grad_accum)
        total_steps = math.ceil(micro_batches / config.grad_accum) * config.epochs
        first_epoch, step = 0, 0
        if state is not None:
            optimizer.load_state_dict(state.optimizer)
            if state.scaler:
                scaler.load_state_dict(state.scaler)
            first_epoch, step = state.epoch, state.step
        history = self.history.setdefault(stage.name, [])
        distributed.broadcast_(self._learned(buffers=False))
        with _only_these_learn(self.method, params):
            for epoch in range(first_epoch, config.epochs):
                (loader.batch_sampler if config.sampler == "balanced" else loader.sampler).set_epoch(epoch)
                loader.generator.manual_seed(derive_seed(self.seed, stage.name, epoch, distributed.rank()))
                epoch_start = time.perf_counter()
                means, step = self.train_epoch(
                    stage,
                    config,
                    loader,
                    micro_batches,
                    optimizer,
                    scaler,
                    params,
                    amp_dtype,
                    epoch,
                    step,
                    total_steps,
                )
                distributed.broadcast_(self._learned(buffers=True))
                summary = {
                    "epoch": epoch + 1,
                    **distributed.all_reduce_mean(means),
                    "lr": scheduled_lr(config, step - 1, total_steps),
                    "steps": math.ceil(micro_batches / config.grad_accum),
                    "seconds": time.perf_counter() - epoch_start,
                }
                history.append(summary)
                self.log(
                    {
                        "event": "epoch",
                        "stage": stage.name,
                        **summary,
                        "step": step,
                        "seconds": time.perf_counter() - self.start,
                    }
                )
                if self.out is not None:
                    self.save_checkpoint(index, stage, epoch + 1, step, optimizer, scaler)

    def non_finite_message(self, where: str, losses: object) -> str:
        kept = (
            f"; nothing in {self.out} was overwritten: resume=True continues from the last good checkpoint"
            if self.out is not None
            else ""
        )
        advice = "; try a lower lr (or amp=False if training with amp)"
        return f"{where}: non-finite loss ({losses}); the weights were not updated{kept}{advice}"

    def _learned(self, buffers: bool) -> list[torch.Tensor]:
        """The method's learned parameters (or buffers), i.e. everything outside the frozen backbones."""
        items = self.method.named_buffers() if buffers else self.method.named_parameters()
        return [t for name, t in items if not name.startswith(FROZEN_PREFIXES)]

    def train_epoch(
        self,
        stage: Stage,
        config: TrainConfig,
        loader: DataLoader,
        micro_batches: int,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        params: list[nn.Parameter],
        amp_dtype: torch.dtype | None,
        epoch: int,
        step: int,
        total_steps: int,
    ) -> tuple[dict[str, float], int]:
        """One pass over `loader` (at most `micro_batches`); returns loss means and the new step count."""
        self.method.train()
        steps_per_epoch = math.ceil(micro_batches / config.grad_accum)
        totals: dict[str, float] = {}
        window: list[dict[str, float]] = []
        group: list[dict[str, float]] = []
        with tqdm(
            total=steps_per_epoch,
            desc=f"{stage.name} {epoch + 1}/{config.epochs}",
            disable=not self.show_progress,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(itertools.islice(loader, micro_batches)):
                group_size = min(config.grad_accum, micro_batches - (i - i % config.grad_accum))
                batch = batch.to(self.device)
                with torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                    if stage.needs_progress:
                        progress = TrainProgress(stage.name, epoch, config.epochs, step, total_steps)
                        out = stage.loss(batch, progress)  # type: ignore[call-arg]
                    else:
                        out = stage.loss(batch)
                if "loss" not in out:
                    raise ValueError(f"stage {stage.name!r}: its loss returned {sorted(out)}, without 'loss'")
                group.append(
                    {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
                )
                scaler.scale(out["loss"] / group_size).backward()
                if len(group) < group_size:
                    continue
                bad = [g for g in group if not math.isfinite(g["loss"])]
                if distributed.average_gradients(params, bool(bad)) or bad:
                    where = f"stage {stage.name!r}, epoch {epoch + 1}, step {step + 1}"
                    raise NonFiniteError(
                        self.non_finite_message(where, bad[0] if bad else "on another process")
                    )
                lr = scheduled_lr(config, step, total_steps)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                means = {k: sum(g[k] for g in group) / len(group) for k in group[0]}
                group = []
                for k, v in means.items():
                    totals[k] = totals.get(k, 0.0) + v
                window.append(means)
                bar.set_postfix(loss=f"{means['loss']:.4g}", lr=f"{lr:.3g}")
                bar.update()
                if step % self.log_every == 0:
                    self.log(
                        {
                            "event": "step",
                            "stage": stage.name,
                            "epoch": epoch + 1,
                            "step": step,
                            **{k: sum(w[k] for w in window) / len(window) for k in window[0]},
                            "lr": lr,
                            "seconds": time.perf_counter() - self.start,
                        }
                    )
                    window = []
        return {k: v / steps_per_epoch for k, v in totals.items()}, step


@contextlib.contextmanager
def _only_these_learn(method: Method, params: list[nn.Parameter]) -> Iterator[None]:
    """Temporarily stop gradients for the method's parameters outside this stage.

    Earlier stages' parts stay trainable flags-wise but get no gradient now: autograd neither computes
    nor accumulates gradients the optimiser would never apply. Gradients still flow *through* them.
    """
    keep = {id(p) for p in params}
    paused = [p for p in method.parameters() if p.requires_grad and id(p) not in keep]
    for p in paused:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in paused:
            p.requires_grad_(True)
