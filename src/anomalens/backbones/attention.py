"""Attention kernels used by the CLIP-based methods, as pure functions on per-head tensors.

All functions take queries/keys/values shaped ``(B, h, N, d)`` (batch, heads, tokens, head dim) and
return either attention *weights* ``(B, h, N, N)`` or attention *outputs* ``(B, h, N, d)``. The
out-projection of a block is not applied here; `ClipBackbone.attention_output` does that.

Equations refer to the Crane paper (``papers/003``, §3.1) and to AA-CLIP's V-V attention (paper 002,
official code ``model/transformer.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# E-Attn variants: which self-correlation terms are summed (Crane Table 3.c; official `attn_type`).
EATTN_VARIANTS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "qq": ("q",),
    "kk": ("k",),
    "vv": ("v",),
    "qq+kk": ("q", "k"),
    "qq+vv": ("q", "v"),
    "kk+vv": ("k", "v"),
}

# Single-path attention kinds accepted by `ClipBackbone.encode_image(attention=...)`.
ATTENTION_KINDS = ("standard", "vv", "qq", "kk", "vv-batch")


def standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q kᵀ · scale) v`` (no mask, no dropout).

    Args:
        q, k, v: (B, h, N, d) queries, keys, values.
        scale: logit scale, ``d ** -0.5`` for CLIP.

    Returns:
        (B, h, N, d) attention output before the out-projection.
    """
    return F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, h, N, d)


def self_correlation_weights(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Self-correlation weights ``A(x) = softmax(x xᵀ · scale)`` over the last axis (Crane Eq. 2).

    Args:
        x: (B, h, N, d) one of q, k or v.
        scale: logit scale, ``d ** -0.5`` as in the official Crane and AA-CLIP code.

    Returns:
        (B, h, N, N) row-stochastic weights.
    """
    logits = torch.matmul(x, x.transpose(-1, -2)) * scale  # (B, h, N, N)
    return logits.softmax(dim=-1)


def eattn_weights(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, variant: str = "qkv"
) -> torch.Tensor:
    """E-Attn weights ``W_l = A(K_l) + A(Q_l) + A(V_l)`` (Crane Eq. 3) or a subset of the terms.

    The terms are *summed*, not averaged (rows of the "qkv" variant sum to 3), as in the paper and the
    official code; ``variant`` names the summed terms ("qkv", "qq", "kk", "vv", "qq+kk", "qq+vv", "kk+vv").

    Args:
        q, k, v: (B, h, N, d).
        scale: logit scale of each self-correlation (``d ** -0.5``).
        variant: key of `EATTN_VARIANTS`.

    Returns:
        (B, h, N, N) attention weights.
    """
    terms = {"q": q, "k": k, "v": v}
    names = _variant_terms(variant)
    weights = self_correlation_weights(terms[names[0]], scale)  # (B, h, N, N)
    for name in names[1:]:
        weights = weights + self_correlation_weights(terms[name], scale)
    return weights


def eattn_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, variant: str = "qkv"
) -> torch.Tensor:
    """E-Attn output ``W_l V`` (Crane Eq. 3 weights applied to V) without materialising ``W_l``.

    ``Σ_t softmax(t tᵀ·scale) V = Σ_t SDPA(t, t, V)``, so each term runs as one fused attention call;
    equal to ``eattn_weights(q, k, v, scale, variant) @ v``.

    Returns:
        (B, h, N, d) attention output before the out-projection.
    """
    terms = {"q": q, "k": k, "v": v}
    names = _variant_terms(variant)
    out = F.scaled_dot_product_attention(terms[names[0]], terms[names[0]], v, scale=scale)  # (B, h, N, d)
    for name in names[1:]:
        out = out + F.scaled_dot_product_attention(terms[name], terms[name], v, scale=scale)
    return out


def _variant_terms(variant: str) -> tuple[str, ...]:
    if variant not in EATTN_VARIANTS:
        raise ValueError(f"unknown E-Attn variant {variant!r}; choose from {sorted(EATTN_VARIANTS)}")
    return EATTN_VARIANTS[variant]


def single_path_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kind: str
) -> torch.Tensor:
    """Attention output for a main-path override: "standard", or self-correlation "vv"/"qq"/"kk".

    "vv" is AA-CLIP's V-V attention (``q = k = v = V``): ``softmax(V Vᵀ · scale) V``. "qq"/"kk" use the
    self-correlation of q or k as the weights and aggregate V. "vv-batch" is the official AA-CLIP stage-1
    V-V attention, which reads its sequence-first input as batch-first: for each token position and head,
    the images of the batch attend to each other (AA-CLIP ``official_compat`` only; docs/design-notes.md).

    Args:
        q, k, v: (B, h, N, d).
        scale: ``d ** -0.5``.
        kind: one of `ATTENTION_KINDS`.

    Returns:
        (B, h, N, d) attention output before the out-projection.
    """
    if kind == "standard":
        return standard_attention(q, k, v, scale)
    if kind == "vv":
        return F.scaled_dot_product_attention(v, v, v, scale=scale)  # (B, h, N, d)
    if kind == "vv-batch":
        vt = v.transpose(0, 2)  # (N, h, B, d): attend over the batch axis
        return F.scaled_dot_product_attention(vt, vt, vt, scale=scale).transpose(0, 2)  # (B, h, N, d)
    if kind == "qq":
        return F.scaled_dot_product_attention(q, q, v, scale=scale)  # (B, h, N, d)
    if kind == "kk":
        return F.scaled_dot_product_attention(k, k, v, scale=scale)  # (B, h, N, d)
    raise ValueError(f"unknown attention kind {kind!r}; choose from {ATTENTION_KINDS}")


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """Patch cosine similarities ``S = ⟨Z^D, Z^D⟩`` (Crane Eq. 5).

    Args:
        features: (B, N, C) patch features (e.g. DINOv2 patch tokens, flattened grid).

    Returns:
        (B, N, N) cosine similarities.
    """
    z = F.normalize(features, dim=-1)  # (B, N, C)
    return torch.matmul(z, z.transpose(-1, -2))  # (B, N, N)


def dattn_weights(
    sim: torch.Tensor,
    beta: float = 1.2,
    gamma: float = 3.0,
    eps: float = 0.0,
    mean: str = "image",
) -> torch.Tensor:
    """D-Attn weights ``W = softmax(S' + M)`` with ``S' = (S − β·mean S)·γ`` (Crane Eq. 6).

    ``M_ij = −∞`` where ``S'_ij < ε`` and 0 otherwise. The paper leaves ε unspecified; the official code
    masks ``S' < 0``, i.e. ε = 0 in the shifted/scaled units (default). The diagonal is never masked, so
    every row keeps at least itself (as in the official code, where ``S_ii = 1``).

    ``mean="image"`` takes mean S per image (batch invariant, our default); ``mean="batch"`` takes it over
    the whole (B, N, N) tensor, as the official code does (results then depend on the batch).

    Args:
        sim: (B, N, N) cosine similarities, e.g. from `cosine_similarity_matrix`.
        beta, gamma: shift and temperature (1.2 and 3 for DINOv2 in Crane).
        eps: masking threshold ε in the shifted/scaled units.
        mean: "image" or "batch".

    Returns:
        (B, 1, N, N) weights, broadcast over heads (the same mask for every head).
    """
    if mean == "image":
        centre = sim.mean(dim=(-2, -1), keepdim=True)  # (B, 1, 1)
    elif mean == "batch":
        centre = sim.mean()
    else:
        raise ValueError(f"mean must be 'image' or 'batch', got {mean!r}")
    logits = (sim - beta * centre) * gamma  # (B, N, N)
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)  # (N, N)
    masked = (logits < eps) & ~eye  # (B, N, N)
    logits = logits.masked_fill(masked, float("-inf"))
    return logits.softmax(dim=-1).unsqueeze(1)  # (B, 1, N, N)


def resample_grid(
    tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """Resample patch tokens laid out on a ``src`` grid to a ``dst`` grid (``align_corners=False``).

    Crane resamples CLIP's per-head values to the DINO grid before D-Attn when the grids differ.

    Args:
        tokens: (..., N, d) with N = src[0]·src[1], patches only, row-major.

    Returns:
        (..., dst[0]·dst[1], d); ``tokens`` itself when the grids are equal.
    """
    if tuple(src) == tuple(dst):
        return tokens
    lead, (n, d) = tokens.shape[:-2], tokens.shape[-2:]
    if n != src[0] * src[1]:
        raise ValueError(f"{n} tokens do not fill a {src[0]}x{src[1]} grid")
    grid = tokens.reshape(-1, src[0], src[1], d).permute(0, 3, 1, 2)  # (L, d, gh, gw)
    grid = F.interpolate(grid, size=tuple(dst), mode=mode, align_corners=False)  # (L, d, gh', gw')
    return grid.permute(0, 2, 3, 1).reshape(*lead, dst[0] * dst[1], d)
