"""Segmentation and classification losses shared by the trainable methods.

Written from the formulas of the official code bases (cited per function), so that a method trained
here optimises the same objective as the one that produced the paper's numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

F_ = TypeVar("F_", bound=Callable[..., Any])
_HALF = (torch.float16, torch.bfloat16)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is half precision (fp16, bf16); float32 and float64 tensors unchanged
    (so a model converted with ``.double()`` computes in float64 throughout, e.g. for parity tests)."""
    return t.float() if t.dtype in _HALF else t


def full_precision(fn: F_) -> F_:
    """Decorator: run `fn` in float32 whatever the autocast context (training with ``amp=True``).

    Half-precision tensor arguments (fp16, bf16) are cast to float32 and autocast is off inside, so
    similarity heads (cosines × 100 are too coarse in bf16) and losses are computed in full precision.
    """

    def cast(value: Any) -> Any:
        return at_least_fp32(value) if torch.is_tensor(value) else value

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


@full_precision
def focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Multi-class focal loss on probabilities with label-smoothing clamp (Lin et al. 2017).

    The form of the Hsuxu Loss_ToolBox ``FocalLoss`` that the official AA-CLIP, Crane and AnomalyCLIP
    code trains with (``alpha=None``, so no class weighting). Per pixel, with C classes:

        y   = clamp(one_hot(target), smooth / (C - 1), 1 - smooth)
        p_t = sum_c y_c * p_c + smooth
        l   = -(1 - p_t)^gamma * log(p_t)

    and the mean over all pixels of the batch. ``probs``: (B, C, H, W) (or (N, C)) probabilities, e.g.
    a softmax over [normal, anomalous]; ``target``: (B, H, W) (or (N,)) class indices. Float 0/1 masks
    are accepted and cast with ``.long()`` as the official code does. ``1 - p_t`` is clamped at 0,
    which only matters for inputs that are not probabilities.
    """
    num_classes = probs.shape[1]
    if num_classes < 2:
        raise ValueError(f"focal_loss needs at least 2 classes, got probs of shape {tuple(probs.shape)}")
    p = probs.movedim(1, -1).reshape(-1, num_classes)  # (N, C)
    t = target.reshape(-1).long()  # (N,)
    if t.numel() != p.shape[0]:
        raise ValueError(f"target {tuple(target.shape)} does not match probs {tuple(probs.shape)}")
    one_hot = F.one_hot(t, num_classes).to(p.dtype).clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (one_hot * p).sum(dim=1) + smooth  # (N,)
    return (-((1.0 - pt).clamp_min(0.0) ** gamma) * pt.log()).mean()


@full_precision
def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image, averaged over the batch (``BinaryDiceLoss`` of AnomalyCLIP/AA-CLIP/Crane).

        loss = 1 - mean_b (2 * sum(p_b * t_b) + smooth) / (sum(p_b) + sum(t_b) + smooth)

    ``pred``: (B, H, W) values in [0, 1]; ``target``: (B, H, W) 0/1 (any shape with the batch first).
    The official code uses ``smooth = 1`` in numerator and denominator, so an all-zero prediction of an
    all-zero target costs 0, and an image-level sum of 1 behaves like one extra agreeing pixel.
    """
    if pred.shape != target.shape:
        raise ValueError(f"dice_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p = pred.reshape(pred.shape[0], -1)  # (B, HW)
    t = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * t).sum(dim=1) + smooth) / (p.sum(dim=1) + t.sum(dim=1) + smooth)  # (B,)
    return 1.0 - dice.mean()


@full_precision
def binary_focal_loss(
    scores: torch.Tensor,
    target: torch.Tensor,
    *,
    logits: bool,
    alpha: float = 1.0,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Binary focal loss on BCE (InCTRL's ``BinaryFocalLoss``): mean of alpha * (1 - p_t)^gamma * BCE.

    p_t = exp(-BCE) is the probability given to the true label. ``logits=True`` takes ``scores`` as
    logits (BCE-with-logits); ``logits=False`` as probabilities. The official InCTRL training feeds
    *probabilities* (its scores end in a sigmoid) with ``logits=True``, i.e. a second sigmoid inside the
    loss; calling this with probabilities and ``logits=True`` reproduces that (``official_compat``).
    ``target``: same shape as ``scores``, 0/1.
    """
    if scores.shape != target.shape:
        raise ValueError(
            f"binary_focal_loss: scores {tuple(scores.shape)} and target {tuple(target.shape)} differ"
        )
    target = target.to(scores.dtype)
    if logits:
        bce = F.binary_cross_entropy_with_logits(scores, target, reduction="none")
    else:
        bce = F.binary_cross_entropy(scores, target, reduction="none")
    pt = torch.exp(-bce)
    return (alpha * (1.0 - pt) ** gamma * bce).mean()
