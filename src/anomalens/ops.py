"""Tensor operations that several methods share, in one tested place.

* `gaussian_blur`: ``scipy.ndimage.gaussian_filter`` of a batch of maps, on the maps' device;
* `nearest_similarity` / `nearest_distance`: nearest-neighbour search of query rows in a memory bank,
  one matrix product per chunk of queries (the memory held at once is bounded);
* `anchor_logits` / `anchor_probability`: the two-anchor text probability
  softmax(s·[cos(f, t_n), cos(f, t_a)])_a that zero-shot CLIP detectors score with;
* `resolve_device`: "auto" → CUDA when available, else CPU.

Every function works on the device and dtype of its inputs and on batches. Tests compare each with a
reference (scipy, brute force, hand-computed values) in ``tests/test_ops.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from anomalens.losses import full_precision

# Borders of `gaussian_blur`, named as scipy.ndimage names them.
BORDERS = ("reflect", "mirror")
# Entries of the (queries × bank) similarity block held at once by the nearest-neighbour search
# (64 MiB in fp32).
NN_CHUNK_ELEMENTS = 1 << 24


def resolve_device(device: str | torch.device) -> torch.device:
    """Device from a name: "auto" → CUDA when available, else CPU; anything else → `torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------- Gaussian smoothing
def gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    """exp(−x² / 2σ²) at x = −radius..radius, normalised to sum 1: (2·radius + 1,) float64.

    The kernel of ``scipy.ndimage.gaussian_filter`` and of kornia's ``get_gaussian_kernel1d`` (odd size).
    """
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def border_indices(n: int, radius: int, border: str, device: torch.device | None = None) -> torch.Tensor:
    """Source index of each position −radius .. n + radius − 1 of a length-``n`` axis padded by ``radius``.

    "reflect" (scipy's default; numpy's "symmetric"): d c b a | a b c d | d c b a.
    "mirror" (torch's and kornia's "reflect"): d c b | a b c d | c b a.
    Radii longer than the axis keep reflecting, as scipy does.
    """
    i = torch.arange(-radius, n + radius, device=device)  # (n + 2r,)
    if border == "reflect":
        i = i % (2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if border == "mirror":
        if n == 1:
            return torch.zeros_like(i)
        i = i % (2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)
    raise ValueError(f"border must be one of {BORDERS}, got {border!r}")


@functools.lru_cache(maxsize=32)
def blur_matrix(n: int, sigma: float, radius: int, border: str) -> torch.Tensor:
    """The 1-D Gaussian filter of a length-``n`` axis as an (n, n) float64 matrix M, borders included:
    the filtered axis is ``x @ M`` (M[s, o] = Σ of the kernel taps of output o that read sample s).
    Cached: treat it as read-only."""
    kernel = gaussian_kernel1d(sigma, radius)  # (2r+1,)
    src = border_indices(n, radius, border).unfold(0, 2 * radius + 1, 1)  # (n, 2r+1): sample of tap j of o
    dst = torch.arange(n)[:, None].expand_as(src)
    m = torch.zeros(n, n, dtype=torch.float64)
    return m.index_put_(
        (src.reshape(-1), dst.reshape(-1)), kernel.expand_as(src).reshape(-1), accumulate=True
    )


def gaussian_blur(
    maps: torch.Tensor,
    sigma: float,
    radius: int | None = None,
    truncate: float = 4.0,
    border: str = "reflect",
) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(m, sigma, mode=border, truncate=truncate, radius=radius)`` of
    every (H, W) map, on the maps' device: two matrix products with the filter matrices of the axes
    (`blur_matrix`), which BLAS and GPUs run faster than a one-channel convolution.

    The defaults are scipy's (border "reflect", radius ``int(truncate·σ + 0.5)``). kornia's
    ``gaussian_blur2d(x, (k, k), (σ, σ))`` with its default border is ``radius=k // 2, border="mirror"``.

    Args:
        maps: (..., H, W).
        sigma: standard deviation in pixels; ``sigma <= 0`` (or ``radius == 0``) returns ``maps`` itself.

    Returns:
        (..., H, W), same dtype.
    """
    r = int(truncate * sigma + 0.5) if radius is None else radius
    if sigma <= 0 or r == 0:
        return maps
    h, w = maps.shape[-2:]
    along_w = blur_matrix(w, float(sigma), r, border).to(maps.device, maps.dtype)  # (W, W)
    along_h = blur_matrix(h, float(sigma), r, border).to(maps.device, maps.dtype)  # (H, H)
    out = maps @ along_w  # (..., H, W)
    return (out.transpose(-1, -2) @ along_h).transpose(-1, -2).contiguous()


# ---------------------------------------------------------------------- nearest neighbours
def nearest_similarity(
    queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int = NN_CHUNK_ELEMENTS
) -> torch.Tensor:
    """max_r ⟨q, b_r⟩ of every query row: the cosine similarity to the nearest bank row when both are
    unit norm.

    Args:
        queries: (..., Q, D).
        bank: (R, D), shared by all queries, or (..., R, D) with the leading shape of ``queries``.
        chunk_elements: at most about this many similarities are held at once (queries are chunked).

    Returns:
        (..., Q).
    """
    return _nearest(queries, bank, chunk_elements, _max_dot)


def nearest_distance(
    queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int = NN_CHUNK_ELEMENTS
) -> torch.Tensor:
    """min_r ‖q − b_r‖₂ of every query row, from |q|² + |b|² − 2⟨q, b⟩ (clamped at 0).

    Shapes as in `nearest_similarity`.
    """
    return _nearest(queries, bank, chunk_elements, _min_distance)


def _max_dot(q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return torch.matmul(q, bank.transpose(-1, -2)).amax(dim=-1)  # (G, c)


def _min_distance(q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    d2 = (
        (q**2).sum(dim=-1, keepdim=True)
        + (bank**2).sum(dim=-1)[:, None]
        - 2.0 * torch.matmul(q, bank.transpose(-1, -2))
    )  # (G, c, R)
    return d2.amin(dim=-1).clamp_min(0.0).sqrt()


def _nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    chunk_elements: int,
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Apply ``reduce((G, c, D) queries, (G, R, D) bank) → (G, c)`` to chunks of c query rows."""
    *lead, q_rows, d = queries.shape
    if bank.ndim == 2:  # one bank for every query: all query rows form one group
        q = queries.reshape(1, -1, d)  # (1, M, D)
        groups = bank[None]  # (1, R, D)
    elif tuple(bank.shape[:-2]) == tuple(lead):
        q = queries.reshape(-1, q_rows, d)  # (G, Q, D)
        groups = bank.reshape(-1, *bank.shape[-2:])  # (G, R, D)
    else:
        raise ValueError(f"bank of shape {tuple(bank.shape)} does not match queries {tuple(queries.shape)}")
    if bank.shape[-1] != d:
        raise ValueError(f"bank rows have {bank.shape[-1]} dims, queries {d}")
    if torch.compiler.is_exporting():  # a symbolic batch: all queries against the bank at once
        return reduce(q, groups).reshape(*lead, q_rows)
    g, rows, r = q.shape[0], q.shape[1], groups.shape[1]
    chunk = max(1, chunk_elements // max(1, g * r))
    out = torch.cat([reduce(q[:, s : s + chunk], groups) for s in range(0, rows, chunk)], dim=1)  # (G, M)
    return out.reshape(*lead, q_rows)


# ---------------------------------------------------------------------- text anchors
@full_precision
def anchor_logits(features: torch.Tensor, anchors: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·[⟨f, t_n⟩, ⟨f, t_a⟩]: the cosine logits of CLIP's zero-shot classifier when ``features``
    and ``anchors`` are unit norm (callers normalise; nothing is normalised here). Computed in float32
    even under autocast (`losses.full_precision`: cosines × 100 are too coarse in bf16).

    Args:
        features: (B, ..., E) image, patch or window embeddings.
        anchors: (B, 2, E) [t_n, t_a] per image, or (1, 2, E) / (2, E) shared by the batch.
        scale: the logit scale s (CLIP's 100, or 1/τ for a temperature τ).

    Returns:
        (B, ..., 2).
    """
    b, e = features.shape[0], features.shape[-1]
    flat = features.reshape(b, -1, e)  # (B, X, E)
    logits = torch.matmul(flat, anchors.transpose(-1, -2))  # (B, X, 2)
    return scale * logits.reshape(*features.shape[:-1], 2)


@full_precision
def anchor_probability(features: torch.Tensor, anchors: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(s·[cos(f, t_n), cos(f, t_a)])_a, the probability of "anomalous" (shapes of
    `anchor_logits`; returns (B, ...))."""
    return anchor_logits(features, anchors, scale).softmax(dim=-1)[..., 1]
