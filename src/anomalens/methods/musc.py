"""MuSc (Li et al., "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with Mutual Scoring
of the Unlabeled Images", ICLR 2024): zero-shot, training-free, prompt-free scoring of a *set* of
unlabelled test images of one class against each other.

Written from the paper and checked against the official code (xrli-U/MuSc, MIT; read, never copied;
file references in ``docs/methods/musc.md``):

* patch tokens: raw residual-stream tokens after blocks 6, 12, 18, 24 of CLIP ViT-L/14-336 at 518 px
  (CLS dropped);
* LNAMD (local neighbourhood aggregation with multiple degrees): per image and layer, a LayerNorm over
  the whole (C, H, W) token map, then the mean over each r×r patch neighbourhood (zero padding counted),
  for r ∈ {1, 3, 5}, then L2 normalisation (`lnamd`);
* MSM (mutual scoring mechanism): for every patch of image i and every other image j, the Euclidean
  distance to the nearest patch of j; the patch's score is the mean of the lowest 0–30 % of those N − 1
  distances (`patch_to_image_distances`, `interval_average`); averaged over layers and r;
* maps: bilinear (``align_corners=True``) to S; the classification score is the map's maximum;
* RsCIN (re-scoring with constrained image-level neighbourhood): scores min-max normalised over the set
  and averaged over each image's k most similar images (CLS-embedding cosine, weights = similarities)
  for several window sizes k (`rscin`).

The method is set-level (``set_level = True``): `predict` scores each image of the set against all the
others, so a score depends on the whole set but not on its order nor on how `predict` batches the
backbone passes; comparisons are chunked so that their memory is bounded by ``chunk_mib``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.backbones import ClipBackbone
from anomalens.methods.base import (
    BatchPrediction,
    ImageLike,
    Method,
    Prediction,
    broadcast_class_names,
    checked_pixels,
    register,
    resize_maps,
    to_arrays,
)


@dataclass(frozen=True)
class MuScConfig:
    """Options of `MuSc`.

    Attributes:
        image_size: input side S (official ``--img_resize 518``).
        layers: 1-based blocks whose tokens are used, written for a ``ref_depth``-layer ViT (official
            ``--feature_layers 5 11 17 23``, 0-based).
        ref_depth: depth ``layers`` is written for.
        r_list: LNAMD aggregation degrees r (odd).
        interval: (low, high) fractions of the N − 1 patch-to-image distances averaged by MSM, lowest
            first (official ``topmin_min=0, topmin_max=0.3``).
        rscin_k: RsCIN window sizes k (official MVTec AD / BTAD (1, 2, 3), VisA (1, 8, 9)); () = no
            re-scoring (the score is the map maximum).
        chunk_mib: memory bound of the patch comparisons, in MiB (512: each image pair of a 200-image
            set is multiplied once at the paper's shape, 37×37 patches; see `mutual_scores`).
    """

    image_size: int = 518
    layers: tuple[int, ...] = (6, 12, 18, 24)
    ref_depth: int = 24
    r_list: tuple[int, ...] = (1, 3, 5)
    interval: tuple[float, float] = (0.0, 0.3)
    rscin_k: tuple[int, ...] = (1, 2, 3)
    chunk_mib: float = 512.0


CACHE_BLOCK = 2**20  # float32 entries of one similarity block (4 MiB)


# ---------------------------------------------------------------------- equations
def layer_norm_map(tokens: torch.Tensor) -> torch.Tensor:
    """LNAMD's normalisation: each image's (L, C) patch tokens standardised over all L·C entries
    (official: a fresh ``LayerNorm([C, H, W])``, eps 1e-5, unit weight, zero bias).

    Args:
        tokens: (B, L, C).

    Returns:
        (B, L, C).
    """
    return F.layer_norm(tokens, tokens.shape[1:])


def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """LNAMD at degree r: the mean over each patch's r×r neighbourhood, zero padding counted (the
    official unfold + adaptive average pooling), then L2-normalised.

    Args:
        tokens: (B, L, C) layer-normalised patch tokens, L = gh·gw row-major.
        grid: (gh, gw).
        r: odd neighbourhood side (1 = the patch itself).

    Returns:
        (B, L, C) unit vectors.
    """
    if r > 1:
        fmap = tokens.transpose(1, 2).unflatten(-1, grid)  # (B, C, gh, gw)
        fmap = F.avg_pool2d(fmap, r, stride=1, padding=r // 2, count_include_pad=True)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, L, C)
    return F.normalize(tokens, dim=-1)


def patch_to_image_distances(z: torch.Tensor, rows: range, tile: int) -> torch.Tensor:
    """MSM's patch-to-image distance for the query images ``rows`` of the set: for each of their patches
    and each image of the set (their own included), the Euclidean distance to that image's nearest
    patch, ‖q − z‖ = √(2 − 2 cos) for unit vectors.

    The cosine similarities are computed ``tile`` images × ``tile`` images at a time, in one reused
    (tile·L) × (tile·L) buffer. A block between two query tiles serves both of them (the similarities of
    image b's patches to image a's are the transpose of a's to b's), so when ``rows`` is the whole set
    every image pair is multiplied once. Nearest neighbours are maxima: the tiling does not change the
    result.

    Args:
        z: (N, L, C) unit vectors of the N images of the set.
        rows: consecutive query images (step 1).
        tile: images per side of one similarity block (≥ 1).

    Returns:
        (q, L, N) distances, q = len(rows).
    """
    n, length, _ = z.shape
    start, stop = rows.start, rows.stop
    flat = z.flatten(0, 1)  # (N·L, C)
    buffer = z.new_empty(min(tile, len(rows)) * length * min(tile, n) * length)
    table = z.new_empty(len(rows), length, n)  # largest similarities, then distances in place
    for a in range(start, stop, tile):
        a_end = min(a + tile, stop)
        queries = flat[a * length : a_end * length]  # (ta·L, C)
        for c in range(0, n, tile):
            c_end = min(c + tile, n)
            shared = start <= c and c_end <= stop and (c - start) % tile == 0  # c is a query tile too
            if shared and c < a:
                continue  # filled from the block (c, a)
            if shared and c == a and tile == 1:
                table[a - start, :, a] = 1.0  # an image's own patches: similarity 1
                continue
            sims = buffer[: len(queries) * (c_end - c) * length].view(len(queries), -1)
            torch.mm(queries, flat[c * length : c_end * length].T, out=sims)  # (ta·L, tc·L)
            sims = sims.view(a_end - a, length, c_end - c, length)
            table[a - start : a_end - start, :, c:c_end] = sims.amax(dim=3)  # (ta, L, tc)
            if shared and c > a:
                table[c - start : c_end - start, :, a:a_end] = sims.amax(dim=1).permute(1, 2, 0)
    return table.mul_(-2.0).add_(2.0).clamp_min_(0.0).sqrt_()


def interval_average(distances: torch.Tensor, interval: tuple[float, float]) -> torch.Tensor:
    """MSM's interval average: sort each patch's M patch-to-image distances ascending and average the
    entries ⌊low·M⌋ … ⌊high·M⌋ − 1 (official ``topmin_min`` / ``topmin_max``); at least one entry.

    Args:
        distances: (..., M).
        interval: (low, high) fractions in [0, 1].

    Returns:
        (...).
    """
    m = distances.shape[-1]
    low = min(int(interval[0] * m), m - 1)
    high = max(int(interval[1] * m), low + 1)
    return distances.topk(high, dim=-1, largest=False).values[..., low:].mean(dim=-1)  # ascending


def rscin(scores: torch.Tensor, embeddings: torch.Tensor, windows: Sequence[int]) -> torch.Tensor:
    """RsCIN: re-score each image by its k most similar images, averaged over the window sizes k.

    s̃ = (s − min s) / (max s − min s); W = E Eᵀ (cosine similarities of the unit image embeddings);
    for each k, W_k keeps each row's k largest entries (the image itself included) and is row-normalised
    (D_k⁻¹ W_k); the new score is the mean over k of D_k⁻¹ W_k s̃. k is capped at the set size.

    Args:
        scores: (N,) classification scores.
        embeddings: (N, E) unit image embeddings.
        windows: window sizes k ≥ 1.

    Returns:
        (N,) re-scored values.
    """
    spread = scores.max() - scores.min()
    normalised = (scores - scores.min()) / spread if spread > 0 else torch.zeros_like(scores)
    similarity = embeddings @ embeddings.T  # (N, N)
    out = []
    for k in windows:
        top = similarity.topk(min(k, len(scores)), dim=1)  # (N, k)
        kept = torch.zeros_like(similarity).scatter(1, top.indices, top.values)  # (N, N)
        out.append((kept / kept.sum(dim=1, keepdim=True)) @ normalised)
    return torch.stack(out).mean(dim=0)


# ---------------------------------------------------------------------- method
@register("musc")
class MuSc(Method):
    """MuSc: zero-shot mutual scoring of a set of unlabelled images of one class."""

    config_class = MuScConfig
    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    resize = "short_side_crop"  # open_clip's preprocess: short side to S, centre crop
    set_level = True

    def __init__(self, config: MuScConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        bad = [r for r in config.r_list if r < 1 or r % 2 == 0]
        if bad or not config.r_list:
            raise ValueError(f"musc: r_list must hold positive odd numbers, got {config.r_list}")
        low, high = config.interval
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"musc: interval must satisfy 0 <= low < high <= 1, got {config.interval}")
        if any(k < 1 for k in config.rscin_k):
            raise ValueError(f"musc: rscin_k window sizes must be >= 1, got {config.rscin_k}")
        if config.chunk_mib <= 0:
            raise ValueError(f"musc: chunk_mib must be positive, got {config.chunk_mib}")
        self.taps = backbone.map_layers(config.layers, config.ref_depth)

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, 3, S, S) → per tap layer-normalised patch tokens (B, L, C) and unit CLS embeddings (B, E)."""
        out = self.backbone.encode_image(images, layers=self.taps)
        tokens = [layer_norm_map(out.tokens[t][:, 1:].float()) for t in self.taps]
        return tokens, F.normalize(out.cls.float(), dim=-1)

    @torch.no_grad()
    def mutual_scores(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """MSM maps of the whole set: mean over taps and r of each patch's interval-averaged distance to
        the N − 1 other images. tokens: per tap (N, L, C) → (N, L).

        Memory beyond the stored tokens and one LNAMD copy of one tap: one similarity block of at most
        4 MiB and a quarter of ``chunk_mib`` (at least one image pair), and at most half of ``chunk_mib``
        for the (q, L, N) distances of q query images (at least one image; the larger q, the more image
        pairs are multiplied once for both images); LNAMD runs on as many images at a time.
        """
        n, length, width = tokens[0].shape
        budget = self.config.chunk_mib * 2**20 / 4  # float32 entries
        block = min(budget / 4, CACHE_BLOCK)  # ≤ 4 MiB blocks stay in cache: fastest on CPU
        tile = max(1, int(math.sqrt(block) / length))  # (tile·L)² ≤ block
        q = max(tile, int(budget / 2 / (length * n)) // tile * tile)  # q·L·N ≤ budget / 2
        step = max(1, int(budget / 2 / (length * width)))  # images per LNAMD pass
        total = torch.zeros(n, length, dtype=torch.float64, device=tokens[0].device)
        for layer in tokens:
            for r in self.config.r_list:
                z = torch.empty_like(layer)  # (N, L, C)
                for s in range(0, n, step):
                    z[s : s + step] = lnamd(layer[s : s + step], self.backbone.grid, r)
                for start in range(0, n, q):
                    rows = range(start, min(start + q, n))
                    d = patch_to_image_distances(z, rows, tile)  # (q, L, N)
                    for i, own in enumerate(rows):
                        others = torch.cat([d[i, :, :own], d[i, :, own + 1 :]], dim=1)  # (L, N-1)
                        total[own] += interval_average(others, self.config.interval).double()
        return (total / (len(tokens) * len(self.config.r_list))).float()

    def score_set(
        self, maps: torch.Tensor, embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, L) patch scores → maps (N, S, S) (bilinear, ``align_corners=True``), their maxima (N,) and
        the RsCIN scores (N,)."""
        size = (self.backbone.image_size,) * 2
        grid = maps.unflatten(1, self.backbone.grid)[:, None]  # (N, 1, gh, gw)
        full = F.interpolate(grid, size=size, mode="bilinear", align_corners=True)[:, 0]  # (N, S, S)
        peak = full.flatten(1).amax(dim=1)  # (N,)
        scores = rscin(peak, embeddings, self.config.rscin_k) if self.config.rscin_k else peak
        return full, peak, scores

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def forward_batch(self, images: torch.Tensor, class_names: list[str], support: Any) -> BatchPrediction:
        """The batch is the set: (N, 3, S, S) → RsCIN scores (N,), maps (N, S, S), {"map_max": (N,)}."""
        tokens, embeddings = self.encode(images)
        full, peak, scores = self.score_set(self.mutual_scores(tokens), embeddings)
        return BatchPrediction(scores, full, {"map_max": peak})

    @torch.no_grad()
    def predict(
        self,
        images: np.ndarray | Sequence[ImageLike],
        class_names: str | Sequence[str] | None = None,
        support: Sequence[ImageLike] | np.ndarray | None = None,
        batch_size: int = 16,
        *,
        pixels: torch.Tensor | None = None,
    ) -> Prediction:
        """Score a set of ≥ 2 unlabelled images of one class against each other.

        ``batch_size`` only sets how many images go through the backbone at once; the scores are those
        of the whole set. ``extras["map_max"]`` holds the scores before RsCIN (the maps' maxima).
        ``pixels``: as in `Method.predict`.
        """
        arrays = to_arrays(images, "images")
        pixels = checked_pixels(pixels, len(arrays))
        names = set(broadcast_class_names(class_names, len(arrays)))
        if support is not None:
            raise ValueError("musc is zero-shot: it scores the images against each other (no support)")
        if len(names) > 1:
            raise ValueError(
                f"musc scores a set of one class; got classes {sorted(names)} (call once per class)"
            )
        if len(arrays) < 2:
            raise ValueError("musc scores a set of images against each other: give at least 2 images")
        self.eval()
        tokens: list[list[torch.Tensor]] = [[] for _ in self.taps]
        embeddings = []
        for start in range(0, len(arrays), batch_size):
            if pixels is None:
                x = self.backbone.preprocess(arrays[start : start + batch_size], resize=self.resize)
            else:
                x = self.backbone.normalize(pixels[start : start + batch_size])
            chunk_tokens, chunk_embeddings = self.encode(x.to(self.device))
            for store, t in zip(tokens, chunk_tokens, strict=True):
                store.append(t)
            embeddings.append(chunk_embeddings)
        maps = self.mutual_scores([torch.cat(t) for t in tokens])
        full, peak, scores = self.score_set(maps, torch.cat(embeddings))
        sized = resize_maps(full, [a.shape[:2] for a in arrays], self.resize)
        out_maps = np.stack(sized) if len({m.shape for m in sized}) == 1 else sized
        extras = {"map_max": peak.double().cpu().numpy()}
        return Prediction(scores.float().cpu().numpy(), out_maps, extras)
