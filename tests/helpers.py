"""Assertions shared by the tests."""

from __future__ import annotations

import torch

# A real change of these O(1) features is ≥ 1e-2 in every case measured; float32 rounding across CPUs,
# thread counts and vector widths stays below 1e-5. A negated `allclose` with a tiny atol would also pass
# on a pure rounding difference, so "differs" always means "differs by more than this".
DIFFERS_BY = 1e-3


def differ(a: torch.Tensor, b: torch.Tensor, by: float = DIFFERS_BY) -> bool:
    """True when some entry of `a` and `b` differs by more than `by` (a margin far above rounding)."""
    return bool((a.detach().double() - b.detach().double()).abs().max() > by)


def train_steps(method, stage_name: str, overrides: dict, batches: list) -> dict[str, torch.Tensor]:
    """Run one optimiser step per batch of `batches` (TrainBatch) through the engine's own step code
    (`build_optimizer`, the lr schedule, zero_grad / backward / step of `_Run.train_epoch`) for the stage
    `stage_name` configured with `overrides` (e.g. a recipe's ``train``); returns its trained state."""
    from anomalens.engine.trainer import _Run, build_optimizer, resolve_configs

    stages = {s.name: s for s in method.training_stages()}
    config = resolve_configs(list(stages.values()), overrides)[stage_name]
    stage = stages[stage_name]
    params = list({id(p): p for p in stage.parameters() if p.requires_grad}.values())
    optimizer = build_optimizer(config, params)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    run = _Run(method, None, None, 0, False, 0, 100, None)
    n = len(batches)
    _, steps = run.train_epoch(stage, config, batches, n, optimizer, scaler, params, None, 0, 0, n)
    assert steps == n
    return method.trainable_state()
