"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic prompt learning for zero-shot anomaly detection.

Written from the paper (§3), with facts checked against the MIT official code (zqhang/AnomalyCLIP at
45ed4dd; file:line references and our deviations in ``docs/methods/baselines.md``):

* object-agnostic text prompts: g_n = [V_1..V_E][object], g_a = [W_1..W_E][damaged][object],
  E = 12 learnable context tokens per side (N(0, 0.02)); the prompt strings are
  "X … X object." / "X … X damaged object." with the X embeddings replaced by the contexts;
* text-encoder refinement: learnable deep prompts (4 tokens, N(0, 0.02)) replace positions 1..4
  at the input of text blocks 2..9 of 12 (mapped to the text depth);
* DPAM (diagonally prominent attention map): a V-V attention path from block 6 of 24 on (q = k = v =
  V from ``ln_1`` of the original path, no FFN, accumulated beside the unchanged original path:
  `EAttnSpec(variant="vv")`); the local
  features are that path's tokens at blocks 6, 12, 18, 24 through ``ln_post`` and ``proj``; the image
  embedding is the original path's CLS;
* scores: P = softmax(cos(·, [g_n, g_a]) / 0.07); image score P_a of the image embedding; per tap the
  patch probabilities are upsampled (bilinear) to S, the map is Σ_taps (P_a + 1 − P_n)/2, then a
  Gaussian σ = 4 (scipy's filter, as the official evaluation, run on the device: `ops.gaussian_blur`);
* training objective (local + global losses):
  λ·Σ_taps [focal(P, mask) + dice(P_a, mask) + dice(P_n, 1 − mask)] + CE(image), λ = 4;
  Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import ClipBackbone, EAttnSpec
from anomalens.losses import dice_loss, focal_loss, full_precision
from anomalens.methods.base import BatchPrediction, Method, Stage, TrainBatch, TrainConfig, register
from anomalens.ops import anchor_logits, anchor_probability, gaussian_blur
from anomalens.prompts import OBJECT_AGNOSTIC_ANOMALOUS, OBJECT_AGNOSTIC_NORMAL


@dataclass(frozen=True)
class AnomalyCLIPConfig:
    """Options of `AnomalyCLIP`.

    Attributes:
        image_size: input side S (official: 518 on ViT-L-14-336); None = the backbone's native size.
        layers: 1-based taps of the local features, written for a ``ref_depth``-layer ViT.
        ref_depth: depth ``layers`` and ``dpam_start`` are written for.
        dpam_start: first block of the V-V path (official ``DPAM_layer=20``: the last 19 of 24 blocks).
        n_ctx: learnable context tokens per prompt (official ``n_ctx``).
        prompt_depth: deep text prompts at text blocks 2..prompt_depth (official ``depth``).
        n_deep: tokens per deep prompt (official ``t_n_ctx``).
        text_ref_depth: text depth ``prompt_depth`` is written for.
        temperature: τ of the cosine logits.
        seg_weight: λ on the segmentation losses.
        sigma: Gaussian smoothing of the map in pixels at S (0 = none).
    """

    image_size: int | None = 518
    layers: tuple[int, ...] = (6, 12, 18, 24)
    ref_depth: int = 24
    dpam_start: int = 6
    n_ctx: int = 12
    prompt_depth: int = 9
    n_deep: int = 4
    text_ref_depth: int = 12
    temperature: float = 0.07
    seg_weight: float = 4.0
    sigma: float = 4.0


@dataclass(frozen=True)
class AnomalyCLIPSchedule:
    """Training-stage defaults: 15 epochs, batch 8, Adam(0.5, 0.999) at lr 1e-3."""

    main: TrainConfig = TrainConfig(epochs=15, batch_size=8, lr=1e-3, betas=(0.5, 0.999))


@full_precision
def patch_probabilities(
    patches: torch.Tensor, text: torch.Tensor, temperature: float, grid: tuple[int, int], size: int
) -> torch.Tensor:
    """softmax(cos / τ) over [normal, anomalous] per patch, upsampled bilinearly to S.

    Args:
        patches: (B, N, E) unit-norm local features.
        text: (2, E) unit-norm [g_n, g_a].
        temperature: τ.
        grid: (gh, gw), gh·gw = N.
        size: output side S.

    Returns:
        (B, 2, S, S) probabilities [P_n, P_a].
    """
    probs = anchor_logits(patches, text, 1.0 / temperature).softmax(dim=-1)  # (B, N, 2)
    probs = probs.transpose(1, 2).unflatten(-1, grid)  # (B, 2, gh, gw)
    return F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)


@register("anomalyclip")
class AnomalyCLIP(Method):
    """AnomalyCLIP: learnable object-agnostic prompts and deep text prompts over a frozen CLIP with DPAM."""

    config_class = AnomalyCLIPConfig
    schedule_class = AnomalyCLIPSchedule
    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    pos_interp = "bilinear"

    def __init__(self, config: AnomalyCLIPConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        if config.n_deep > config.n_ctx:
            raise ValueError(f"anomalyclip: n_deep ({config.n_deep}) must not exceed n_ctx ({config.n_ctx})")
        self.taps = backbone.map_layers(config.layers, config.ref_depth)
        self.dpam = EAttnSpec(
            start=backbone.map_layers([config.dpam_start], config.ref_depth)[0],
            variant="vv",
            taps=tuple(self.taps),
        )
        deep = backbone.map_layers(range(2, config.prompt_depth + 1), config.text_ref_depth, text=True)
        self.deep_layers = [i for i in deep if i >= 2]
        width = backbone.text_width
        self.context = nn.Parameter(0.02 * torch.randn(2, config.n_ctx, width))  # [normal, anomalous]
        self.deep_prompts = nn.Parameter(0.02 * torch.randn(len(self.deep_layers), config.n_deep, width))
        placeholder = " ".join(["X"] * config.n_ctx)
        tokens = backbone.tokenize(
            [f"{placeholder} {OBJECT_AGNOSTIC_NORMAL}.", f"{placeholder} {OBJECT_AGNOSTIC_ANOMALOUS}."]
        )  # (2, L)
        self.register_buffer("prompt_tokens", tokens, persistent=False)
        with torch.no_grad():
            embeddings = backbone.token_embeddings(tokens)  # (2, L, text_width)
        self.register_buffer("token_embeddings", embeddings, persistent=False)

    def text_features(self) -> torch.Tensor:
        """(2, E) unit-norm [g_n, g_a] from the learnable contexts and deep prompts."""
        emb = self.token_embeddings
        n = self.config.n_ctx
        prompts = torch.cat([emb[:, :1], self.context.to(emb.dtype), emb[:, 1 + n :]], dim=1)  # (2, L, Dt)
        deep = dict(zip(self.deep_layers, self.deep_prompts, strict=True))
        return self.backbone.encode_text(self.prompt_tokens, prompt_embeddings=prompts, deep_prompts=deep)

    def _visual(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Frozen features: unit-norm image embedding (B, E) and per-tap local features (B, N, E)."""
        with torch.no_grad():
            out = self.backbone.encode_image(images, eattn=self.dpam, cls_only=True)
            local = [F.normalize(self.backbone.project(out.branch[t][:, 1:]), dim=-1) for t in self.taps]
        return F.normalize(out.cls, dim=-1), local

    def _probabilities(self, local: list[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Per tap (B, 2, S, S) probabilities."""
        b = self.backbone
        return [patch_probabilities(p, text, self.config.temperature, b.grid, b.image_size) for p in local]

    @torch.no_grad()
    def forward_batch(self, images: torch.Tensor, class_names: list[str], support: None) -> BatchPrediction:
        """(B, 3, S, S) → scores (B,) and maps (B, S, S); class names are not used (object-agnostic)."""
        text = self.text_features()
        image, local = self._visual(images)
        score = anchor_probability(image, text, 1.0 / self.config.temperature)  # (B,)
        maps = torch.stack([(p[:, 1] + 1.0 - p[:, 0]) / 2.0 for p in self._probabilities(local, text)]).sum(0)
        return BatchPrediction(score, gaussian_blur(maps, self.config.sigma))

    def loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Training objective: λ·Σ_taps [focal + dice(P_a, mask) + dice(P_n, 1 − mask)] + CE(image logits).

        The segmentation terms use only the images with pixel ground truth.
        """
        text = self.text_features()
        image, local = self._visual(batch.images)
        image_loss = F.cross_entropy(image @ text.T / self.config.temperature, batch.labels)
        rows = batch.has_mask
        masks = batch.masks[rows]
        segmentation = image_loss.new_zeros(())
        if masks.shape[0]:
            for probs in self._probabilities([p[rows] for p in local], text):
                segmentation = (
                    segmentation
                    + focal_loss(probs, masks)
                    + dice_loss(probs[:, 1], masks)
                    + dice_loss(probs[:, 0], 1.0 - masks)
                )
        loss = self.config.seg_weight * segmentation + image_loss
        return {"loss": loss, "segmentation": segmentation.detach(), "image": image_loss.detach()}

    def training_stages(self) -> list[Stage]:
        return [Stage("main", lambda: [self.context, self.deep_prompts], self.loss, self.schedule.main)]
