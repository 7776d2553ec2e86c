"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) on a frozen
CLIP image tower.

Written from the paper (§3), adapted to a ViT backbone (choices in ``docs/methods/baselines.md``):

* locally aware patch features (§3.1): raw residual-stream patch tokens of mid-level blocks
  (6 and 9 of 12, mapped to the backbone's depth; the analogue of WideResNet-50's layer2 + layer3),
  each averaged over its 3×3 patch neighbourhood, concatenated over the blocks;
* memory bank (§3.2): the patch features of the normal images, optionally reduced by greedy coreset
  subsampling (Alg. 1) on a seeded random projection (Johnson-Lindenstrauss, 128 dims);
* scoring (§3.3): each test patch's L2 distance to its nearest bank feature; image score = the
  maximum over patches; map = the patch distances upsampled (bilinear) to S and smoothed with a
  Gaussian σ = 4.

The bank comes from ``support`` (K normal images, the few-shot protocol) or from `PatchCore.fit`
(all normal images of a one-class dataset: the full-shot protocol); explicit support wins.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from anomalens.backbones import ClipBackbone
from anomalens.data.types import Dataset
from anomalens.methods.base import BatchPrediction, Method, register
from anomalens.ops import gaussian_blur, nearest_distance


@dataclass(frozen=True)
class PatchCoreConfig:
    """Options of `PatchCore`.

    Attributes:
        image_size: input side S; None = the backbone's native size.
        layers: 1-based blocks whose tokens are used, written for a ``ref_depth``-layer ViT.
        ref_depth: depth ``layers`` is written for.
        neighbourhood: side p of the local averaging window in patches (paper: 3).
        coreset_ratio: fraction of the bank kept by greedy coreset subsampling; 1.0 keeps every feature
            (default: the few-shot banks are small); the paper's full-shot MVTec AD setting is 0.1.
        projection_dim: dimension of the random projection used for coreset selection (0 = none).
        sigma: Gaussian smoothing of the map in pixels at S (0 = none).
        seed: seed of the coreset projection and starting point.
    """

    image_size: int | None = None
    layers: tuple[int, ...] = (6, 9)
    ref_depth: int = 12
    neighbourhood: int = 3
    coreset_ratio: float = 1.0
    projection_dim: int = 128
    sigma: float = 4.0
    seed: int = 0


def local_patch_features(tokens: torch.Tensor, grid: tuple[int, int], neighbourhood: int) -> torch.Tensor:
    """§3.1 neighbourhood aggregation: mean of each patch feature's p×p neighbourhood (at borders: of
    the patches that exist).

    Args:
        tokens: (B, N, D) patch tokens (CLS dropped), N = gh·gw row-major.
        grid: (gh, gw).
        neighbourhood: odd p.

    Returns:
        (B, N, D).
    """
    fmap = tokens.transpose(1, 2).unflatten(-1, grid)  # (B, D, gh, gw)
    fmap = F.avg_pool2d(fmap, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
    return fmap.flatten(2).transpose(1, 2)


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int, seed: int) -> torch.Tensor:
    """Alg. 1: greedy k-center selection of ``n`` rows, on a seeded Gaussian random projection.

    Starts from a seeded random row, then repeatedly adds the row farthest (L2) from the selected set.

    Args:
        features: (M, D).
        n: rows to keep, 1 ≤ n ≤ M.
        projection_dim: project to this many dimensions first when smaller than D (0 = never).
        seed: seed of the projection and the starting row.

    Returns:
        (n,) long indices into ``features``, in selection order.
    """
    m, d = features.shape
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if 0 < projection_dim < d:
        projection = torch.randn(d, projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = x @ projection.to(x.device)  # (M, d')
    selected = torch.empty(n, dtype=torch.long, device=x.device)
    selected[0] = int(torch.randint(m, (1,), generator=generator))
    nearest = ((x - x[selected[0]]) ** 2).sum(dim=1)  # (M,) squared distance to the selected set
    for i in range(1, n):
        selected[i] = nearest.argmax()
        nearest = torch.minimum(nearest, ((x - x[selected[i]]) ** 2).sum(dim=1))
    return selected


@register("patchcore")
class PatchCore(Method):
    """PatchCore: nearest-neighbour distance to a memory bank of locally aggregated frozen patch features."""

    config_class = PatchCoreConfig
    default_backbone = "ViT-B-16-plus-240"
    default_pretrained = "laion400m_e32"
    needs_support = True

    def __init__(self, config: PatchCoreConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        if config.neighbourhood < 1 or config.neighbourhood % 2 == 0:
            raise ValueError(
                f"patchcore: neighbourhood must be a positive odd number, got {config.neighbourhood}"
            )
        if not 0.0 < config.coreset_ratio <= 1.0:
            raise ValueError(f"patchcore: coreset_ratio must be in (0, 1], got {config.coreset_ratio}")
        self.taps = backbone.map_layers(config.layers, config.ref_depth)
        self.register_buffer("memory_bank", torch.zeros(0, backbone.width * len(self.taps)))

    # ------------------------------------------------------------------ features and bank
    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, N, width·n_taps) locally aware patch features."""
        out = self.backbone.encode_image(images, layers=self.taps)
        grid, p = self.backbone.grid, self.config.neighbourhood
        return torch.cat(
            [local_patch_features(out.tokens[t][:, 1:], grid, p) for t in self.taps], dim=-1
        ).float()

    def subsample(self, features: torch.Tensor) -> torch.Tensor:
        """The coreset of (M, D) features at ``coreset_ratio`` (all of them at 1.0)."""
        n = math.ceil(self.config.coreset_ratio * features.shape[0])
        if n >= features.shape[0]:
            return features
        return features[greedy_coreset(features, n, self.config.projection_dim, self.config.seed)]

    def prepare_support(self, images: torch.Tensor) -> torch.Tensor:
        """Memory bank (M, D) of the K normal support images."""
        return self.subsample(self.patch_features(images).flatten(0, 1))

    def fit(
        self,
        dataset: Dataset,
        batch_size: int = 16,
        out_dir: str | os.PathLike | None = None,
        progress: bool = True,
        **engine_options: Any,
    ) -> dict:
        """Fill the memory bank from the normal images of a one-class ``dataset`` (full-shot protocol).

        Afterwards ``predict`` works without ``support``. With ``out_dir`` the method is saved to
        ``out_dir/model.anomalens`` (as the training engine does). Training-engine options (``seed``,
        ``epochs``, ``lr``, ...) have no meaning here and are ignored. Returns {"images", "bank_size"}.

        Raises:
            ValueError: the dataset has no normal image, or its normal images span several classes
                (one bank per model: load one class, e.g. ``data.load(spec, classes=[name])``).
        """
        normal = [i for i, r in enumerate(dataset.records) if r.label == 0]
        if not normal:
            raise ValueError(
                f"patchcore.fit: {dataset.name!r} has no normal image to build the memory bank from"
            )
        classes = sorted({dataset.records[i].class_name for i in normal})
        if len(classes) > 1:
            raise ValueError(
                f"patchcore.fit: one bank per model, but {dataset.name!r} has normal images of "
                f"{len(classes)} classes ({', '.join(classes)}); fit one model per class"
            )
        chunks = []
        for start in tqdm(range(0, len(normal), batch_size), desc="patchcore bank", disable=not progress):
            images = [dataset[i].image for i in normal[start : start + batch_size]]
            chunks.append(
                self.patch_features(self.backbone.preprocess(images, resize=self.resize)).flatten(0, 1)
            )
        self.memory_bank = self.subsample(torch.cat(chunks))
        self.needs_support = False
        if out_dir is not None:
            self.save(Path(out_dir) / "model.anomalens")  # the training engine's MODEL_FILE
        return {"images": len(normal), "bank_size": self.memory_bank.shape[0]}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """A saved bank has its own size: resize the buffer before the standard copy."""
        saved = state_dict.get(prefix + "memory_bank")
        if saved is not None:
            self.memory_bank = torch.empty_like(saved, device=self.memory_bank.device)
            self.needs_support = saved.shape[0] == 0
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def forward_batch(
        self, images: torch.Tensor, class_names: list[str], support: torch.Tensor | None
    ) -> BatchPrediction:
        """(B, 3, S, S) → scores (B,) = max patch distance, maps (B, S, S) upsampled and smoothed."""
        bank = support if support is not None else self.memory_bank
        if bank.shape[0] == 0:
            raise ValueError("patchcore needs support=[normal images of the class] or a fitted memory bank")
        features = self.patch_features(images)  # (B, N, D)
        distances = nearest_distance(features, bank)  # (B, N) §3.3 patch scores
        size = (self.backbone.image_size,) * 2
        maps = F.interpolate(
            distances.unflatten(-1, self.backbone.grid)[:, None],
            size=size,
            mode="bilinear",
            align_corners=False,
        )[:, 0]  # (B, S, S)
        return BatchPrediction(distances.amax(dim=1), gaussian_blur(maps, self.config.sigma))
