"""APRIL-GAN / VAND (Chen et al., "A Zero-/Few-Shot Anomaly Classification and Segmentation Method for
CVPR 2023 VAND Workshop Challenge", arXiv 2305.17382).

Written from the report, with facts checked against the MIT official code (ByChelsea/VAND-APRIL-GAN at
f13b8a6; file:line references in ``docs/methods/baselines.md``):

* text anchors: WinCLIP-style ensemble of 7 normal / 5 anomalous states × 35 templates, each embedding
  normalised, averaged and re-normalised (`APRIL_GAN_PROMPTS`);
* zero-shot classification: p_a = softmax(100 · [cos(f, t_n), cos(f, t_a)])_a on the CLS embedding;
* segmentation: per tap l (blocks 6, 12, 18, 24 of ViT-L, mapped to the backbone's depth) a learned
  linear map W_l (with bias) takes the *raw* residual-stream patch tokens (no ``ln_post``, CLS dropped)
  to the joint space; logits 100·cos(W_l z, [t_n, t_a]) are upsampled (bilinear, align_corners=True)
  to S, soft-maxed over [n, a]; the map is Σ_l p_a^l;
* few-shot: memory of the K normal images' raw patch tokens per tap; per tap min over the memory of
  (1 − cos), upsampled, summed over taps and added to the zero-shot map;
* training: Σ_l focal(P^l, mask) + dice(p_a^l, mask); Adam lr 1e-3, betas (0.5, 0.999), batch 8,
  15 epochs (the official recipe for training on VisA and testing on MVTec AD).

Image score (per image, batch invariant): (1 − w)·p_a + w·max(map)/n_taps, with w =
``zero_shot_map_weight`` (default 0: the official zero-shot score is p_a only) or
``few_shot_map_weight`` (default 0.5, the official few-shot mix) when support is given. The official
few-shot code min-max normalises max(map) over each evaluated class instead of dividing by n_taps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import ClipBackbone
from anomalens.losses import dice_loss, focal_loss, full_precision
from anomalens.methods.base import BatchPrediction, Method, Stage, TrainBatch, TrainConfig, register
from anomalens.ops import anchor_logits, anchor_probability, nearest_similarity
from anomalens.prompts import (
    WINCLIP_ANOMALOUS_STATES,
    WINCLIP_NORMAL_STATES,
    PromptSet,
    class_word,
)

# The official code's fixed temperature (100 = CLIP's trained logit scale), used for scores and maps.
LOGIT_SCALE = 100.0

# The 35 templates of the official ``prompt_ensemble.py`` (CLIP's ImageNet-style templates).
APRIL_GAN_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
APRIL_GAN_PROMPTS = PromptSet(WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, APRIL_GAN_TEMPLATES)


@dataclass(frozen=True)
class APRILGANConfig:
    """Options of `APRILGAN`.

    Attributes:
        image_size: input side S (official: 518 on ViT-L-14-336); None = the backbone's native size.
        layers: 1-based taps written for a ``ref_depth``-layer ViT, mapped to the backbone's depth; used
            for the learned maps and the few-shot memory (official ``features_list`` and
            ``few_shot_features``).
        ref_depth: depth the ``layers`` are written for.
        zero_shot_map_weight: w in the image score without support.
        few_shot_map_weight: w in the image score with support.
    """

    image_size: int | None = 518
    layers: tuple[int, ...] = (6, 12, 18, 24)
    ref_depth: int = 24
    zero_shot_map_weight: float = 0.0
    few_shot_map_weight: float = 0.5


@dataclass(frozen=True)
class APRILGANSchedule:
    """Training-stage defaults: 15 epochs, batch 8, Adam(0.5, 0.999) at lr 1e-3."""

    main: TrainConfig = TrainConfig(epochs=15, batch_size=8, lr=1e-3, betas=(0.5, 0.999))


@full_precision
def segmentation_probabilities(
    tokens: torch.Tensor, anchors: torch.Tensor, grid: tuple[int, int], size: int
) -> torch.Tensor:
    """Per-tap map of APRIL-GAN: softmax over [n, a] of upsampled ``100 · cos`` logits.

    Args:
        tokens: (B, N, E) projected patch tokens (any norm).
        anchors: (B, 2, E) unit-norm [t_n, t_a] per image.
        grid: (gh, gw) with gh·gw = N.
        size: output side S.

    Returns:
        (B, 2, S, S) probabilities [p_n, p_a].
    """
    logits = anchor_logits(F.normalize(tokens, dim=-1), anchors.to(tokens.dtype), LOGIT_SCALE)  # (B, N, 2)
    logits = logits.transpose(1, 2).unflatten(-1, grid)  # (B, 2, gh, gw)
    logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
    return logits.softmax(dim=1)


def min_cosine_distance(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """min over the memory of (1 − cos): (B, N, D) queries, (R, D) unit-norm memory → (B, N)."""
    return 1.0 - nearest_similarity(F.normalize(queries, dim=-1), memory)


@register("april-gan")
class APRILGAN(Method):
    """APRIL-GAN: linear patch-to-text projections trained with focal + dice; optional few-shot memory."""

    config_class = APRILGANConfig
    schedule_class = APRILGANSchedule
    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"

    def __init__(self, config: APRILGANConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        self.taps = backbone.map_layers(config.layers, config.ref_depth)
        self.projections = nn.ModuleList(nn.Linear(backbone.width, backbone.embed_dim) for _ in self.taps)

    # ------------------------------------------------------------------ text
    def text_anchors(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, E) unit-norm [t_n, t_a] of the official prompt ensemble, cached per class name."""
        return self.prompt_anchors(class_names, lambda c: APRIL_GAN_PROMPTS.build(class_word(c)))

    # ------------------------------------------------------------------ model
    def _tap_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Frozen features: CLS embedding (B, E) and raw patch tokens (B, N, width) per tap."""
        with torch.no_grad():
            out = self.backbone.encode_image(
                images, layers=self.taps, cls_only=self.backbone.depth not in self.taps
            )
        return out.cls, [out.tokens[t][:, 1:] for t in self.taps]

    def _maps(self, tokens: list[torch.Tensor], anchors: torch.Tensor) -> list[torch.Tensor]:
        """Per tap (B, 2, S, S) probabilities from the learned projections."""
        return [
            segmentation_probabilities(proj(tok), anchors, self.backbone.grid, self.backbone.image_size)
            for proj, tok in zip(self.projections, tokens, strict=True)
        ]

    @torch.no_grad()
    def prepare_support(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Few-shot memory: per tap, (K·N, width) unit-norm raw patch tokens of the normal images."""
        _, tokens = self._tap_tokens(images)
        return [F.normalize(t.flatten(0, 1), dim=-1) for t in tokens]

    @torch.no_grad()
    def forward_batch(
        self, images: torch.Tensor, class_names: list[str], support: list[torch.Tensor] | None
    ) -> BatchPrediction:
        """(B, 3, S, S) → scores (B,) and maps (B, S, S)."""
        anchors = self.text_anchors(class_names)  # (B, 2, E)
        cls, tokens = self._tap_tokens(images)
        text_score = anchor_probability(F.normalize(cls.float(), dim=-1), anchors, LOGIT_SCALE)  # (B,)
        anomaly_map = torch.stack([p[:, 1] for p in self._maps(tokens, anchors)]).sum(dim=0)  # (B, S, S)
        weight = self.config.zero_shot_map_weight
        if support is not None:
            distances = [
                min_cosine_distance(tok, memory).unflatten(-1, self.backbone.grid)  # (B, gh, gw)
                for tok, memory in zip(tokens, support, strict=True)
            ]
            size = (self.backbone.image_size,) * 2
            upsampled = F.interpolate(
                torch.stack(distances, dim=1), size=size, mode="bilinear", align_corners=True
            )
            anomaly_map = anomaly_map + upsampled.sum(dim=1)
            weight = self.config.few_shot_map_weight
        map_score = anomaly_map.flatten(1).amax(dim=1) / len(self.taps)
        return BatchPrediction((1.0 - weight) * text_score + weight * map_score, anomaly_map)

    # ------------------------------------------------------------------ training
    def segmentation_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Σ_taps focal(P, mask) + dice(p_a, mask) over the images with pixel ground truth.

        A batch without any pixel ground truth gives a zero loss (its graph is kept for ``backward``).
        """
        supervised = batch.has_mask.any()
        rows = batch.has_mask if supervised else torch.ones_like(batch.has_mask)
        anchors = self.text_anchors(batch.class_names)[rows]  # (b, 2, E)
        _, tokens = self._tap_tokens(batch.images[rows])
        masks = batch.masks[rows]
        focal = dice = masks.new_zeros(())
        for probs in self._maps(tokens, anchors):
            focal = focal + focal_loss(probs, masks)
            dice = dice + dice_loss(probs[:, 1], masks)
        loss = (focal + dice) * supervised
        return {"loss": loss, "focal": focal.detach(), "dice": dice.detach()}

    def training_stages(self) -> list[Stage]:
        return [Stage("main", self.projections.parameters, self.segmentation_loss, self.schedule.main)]
