"""WinCLIP / WinCLIP+ (Jeong et al., CVPR 2023): zero-/few-shot anomaly classification and segmentation.

Written from the paper (the official repository is GPL and is not used as a source); references are to
the paper's §4 (equation numbers are not cited: we worked from the method description):

* compositional prompt ensemble (§4.1): the normal / anomalous text anchors g_n, g_a are the
  re-normalised means of the normalised embeddings of all state x template prompts
  (`anomalens.prompts.winclip_prompts`), cached per class name;
* zero-shot classification (§4.1): ascore_0(x) = softmax(s · [cos(f, g_n), cos(f, g_a)])_a with the
  backbone's CLIP logit scale s and f the image embedding;
* zero-shot segmentation (§4.2): every k×k window of patches (k = 2, 3, stride 1) is embedded by the
  image tower on CLS + its own patch tokens only (`ClipBackbone.encode_windows`), scored like an image,
  and each patch takes the harmonic mean of the scores of the windows covering it; the maps of
  the window scales and the image-level score are combined harmonically as well;
* few-shot WinCLIP+ (§4.3): memories of the K normal images' window embeddings (per scale) and patch
  embeddings; a query feature scores 0.5·(1 − max cos) against its memory, window scores go to
  patches harmonically, the scale maps (patch, 2×2, 3×3) are averaged to M_W; final map
  (M_0 + M_W)/2 and image score (ascore_0 + max M_W)/2.

Choices where the paper is not explicit are listed in ``docs/methods/winclip.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anomalens.backbones import ClipBackbone, window_indices
from anomalens.methods.base import BatchPrediction, Method, register
from anomalens.ops import anchor_probability, nearest_similarity
from anomalens.prompts import winclip_prompts

# Floor of a score before it is inverted in a harmonic mean: a zero distance gives a ~0 mean, not NaN.
HARMONIC_EPS = 1e-12


@dataclass(frozen=True)
class WinCLIPConfig:
    """Options of `WinCLIP` (all serialised into checkpoints and results).

    Attributes:
        image_size: input side S; None = the backbone's native size (240 for ViT-B-16-plus-240).
        scales: window sides in patches (paper: 2 = "small", 3 = "mid").
        stride: window stride in patches (paper: 1).
    """

    image_size: int | None = None
    scales: tuple[int, ...] = (2, 3)
    stride: int = 1


@dataclass
class WinCLIPSupport:
    """WinCLIP+ reference memories of the K normal images, all L2-normalised float32.

    Attributes:
        windows: per scale, (K·n_win, E) window embeddings.
        patches: (K·N, E) patch embeddings of the full-image pass.
    """

    windows: list[torch.Tensor]
    patches: torch.Tensor


def window_coverage(windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """(n_win, N) 0/1 matrix: entry (u, p) is 1 when window u contains patch p."""
    coverage = torch.zeros(windows.shape[0], n_patches, device=windows.device)
    return coverage.scatter_(1, windows, 1.0)


def harmonic_aggregation(scores: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """§4.2 window-to-patch aggregation: harmonic mean of the scores of the windows covering each patch.

        M(p) = |U_p| / Σ_{u ∈ U_p} 1 / s(u)

    Args:
        scores: (B, n_win) window scores, ≥ 0 (floored at `HARMONIC_EPS`).
        coverage: (n_win, N) from `window_coverage`; every patch must be covered.

    Returns:
        (B, N) patch scores.
    """
    inverse = 1.0 / scores.clamp_min(HARMONIC_EPS)  # (B, n_win)
    return coverage.sum(dim=0) / (inverse @ coverage)  # (B, N)


def harmonic_mean(maps: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise harmonic mean of equally shaped score maps (the cross-scale aggregation)."""
    inverse = torch.stack([1.0 / m.clamp_min(HARMONIC_EPS) for m in maps])
    return len(maps) / inverse.sum(dim=0)


def association_distance(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """§4.3 reference association: 0.5 · (1 − max_r cos(q, r)) of each query against a normal memory.

    Args:
        queries: (B, Q, E) features (any norm).
        memory: (R, E) unit-norm float32 reference features.

    Returns:
        (B, Q) distances in [0, 1].
    """
    return 0.5 * (1.0 - nearest_similarity(F.normalize(queries.float(), dim=-1), memory))


@register("winclip")
class WinCLIP(Method):
    """WinCLIP (zero-shot) and WinCLIP+ (when ``support`` normal images are given); no training."""

    config_class = WinCLIPConfig
    default_backbone = "ViT-B-16-plus-240"
    default_pretrained = "laion400m_e32"

    def __init__(self, config: WinCLIPConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        n_patches = backbone.grid[0] * backbone.grid[1]
        for scale in config.scales:
            covered = window_coverage(window_indices(backbone.grid, scale, config.stride), n_patches)
            if not bool((covered.sum(dim=0) > 0).all()):
                raise ValueError(
                    f"winclip: {scale}x{scale} windows with stride {config.stride} leave patches "
                    f"of the {backbone.grid} grid uncovered"
                )

    # ------------------------------------------------------------------ text
    def text_anchors(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, E) unit-norm [g_n, g_a] of the compositional prompt ensemble (§4.1), cached per class."""
        return self.prompt_anchors(class_names, winclip_prompts)

    # ------------------------------------------------------------------ features
    def _windows(self) -> list[torch.Tensor]:
        """Per scale, (n_win, k²) patch indices of the sliding windows."""
        return [
            window_indices(self.backbone.grid, s, self.config.stride).to(self.device)
            for s in self.config.scales
        ]

    @torch.no_grad()
    def prepare_support(self, images: torch.Tensor) -> WinCLIPSupport:
        """WinCLIP+ memories (§4.3) from (K, 3, S, S) normal images."""
        out = self.backbone.encode_image(images)
        patches = self.backbone.project(out.final[:, 1:])  # (K, N, E)
        windows = [self.backbone.encode_windows(images, w) for w in self._windows()]  # (K, n_win, E) each
        return WinCLIPSupport(
            windows=[F.normalize(w.flatten(0, 1).float(), dim=-1) for w in windows],
            patches=F.normalize(patches.flatten(0, 1).float(), dim=-1),
        )

    @torch.no_grad()
    def forward_batch(
        self, images: torch.Tensor, class_names: list[str], support: WinCLIPSupport | None
    ) -> BatchPrediction:
        """(B, 3, S, S) → scores (B,) and maps (B, gh, gw) on the patch grid."""
        b = images.shape[0]
        gh, gw = self.backbone.grid
        scale = self.backbone.logit_scale
        anchors = self.text_anchors(class_names)  # (B, 2, E)
        out = self.backbone.encode_image(images)
        image_score = anchor_probability(_unit(out.cls), anchors, scale)  # (B,) ascore_0 (§4.1)

        windows = self._windows()
        coverages = [window_coverage(w, gh * gw) for w in windows]
        embeddings = [self.backbone.encode_windows(images, w) for w in windows]  # (B, n_win, E) each
        zero_shot = [image_score[:, None].expand(b, gh * gw)]
        for emb, coverage in zip(embeddings, coverages, strict=True):
            zero_shot.append(harmonic_aggregation(anchor_probability(_unit(emb), anchors, scale), coverage))
        zero_shot_map = harmonic_mean(zero_shot)  # (B, N) M_0
        if support is None:
            return BatchPrediction(image_score, zero_shot_map.view(b, gh, gw))

        patches = self.backbone.project(out.final[:, 1:])  # (B, N, E)
        few_shot = [association_distance(patches, support.patches)]
        for emb, memory, coverage in zip(embeddings, support.windows, coverages, strict=True):
            few_shot.append(harmonic_aggregation(association_distance(emb, memory), coverage))
        few_shot_map = torch.stack(few_shot).mean(dim=0)  # (B, N) M_W
        score = 0.5 * (image_score + few_shot_map.amax(dim=1))
        return BatchPrediction(score, (0.5 * (zero_shot_map + few_shot_map)).view(b, gh, gw))


def _unit(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 embeddings (scores are computed in full precision)."""
    return F.normalize(features.float(), dim=-1)
