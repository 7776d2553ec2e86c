"""AdaCLIP (Cao et al., "AdaCLIP: Adapting CLIP with Hybrid Learnable Prompts for Zero-Shot Anomaly
Detection", ECCV 2024, arXiv 2407.15795), with the facts of the MIT official code (caoyunkang/AdaCLIP).

A frozen CLIP ViT gets *hybrid* learnable prompts in both towers:

* static prompts: per prompted block j < J (``prompt_depth``, official 4) n learnable tokens
  (``prompt_length``, official 5; N(0, 0.02)), shared by all images;
* dynamic prompts: from the frozen CLIP image embedding c = ln_post(CLS) @ proj of the image, two linear
  layers give n tokens for the image tower and n for the text tower; the same dynamic tokens are added
  to every prompted block's static tokens (hybrid = static + dynamic).

Image tower: the n tokens are appended after the patch tokens at block 1 and replace the appended ones at
blocks 2..J; they stay in the sequence to the last block (`ClipBackbone.encode_image` ``prompts``). The
patch tokens of the blocks ``layers`` (official 1/4, 2/4, 3/4, 4/4 of the depth), without CLS and without
the prompt tokens, go through one linear projection per block (width → E) and are L2-normalised; the
prompted CLS embedding goes through one more linear layer (E → E) and is L2-normalised.

Text tower: per class the official prompt ensemble (7 normal and 5 anomalous states × 4 templates), with
the hybrid tokens replacing positions 1..n at the input of text blocks 2..J (``deep_prompts``); each side
is the re-normalised mean of its normalised sentence embeddings: t = [t_n, t_a] (per image with dynamic
prompts).

Scores and maps (official ``AdaCLIP.visual_text_similarity``):

* per layer l, patch logits 100·⟨z_l, t⟩ (B, N, 2);
* maps: the logits upsampled bilinearly (align_corners=True) to S, mean over layers, softmax,
  (p_a + 1 − p_n)/2; then Gaussian σ = 4 (scipy defaults);
* HSF (hybrid semantic fusion, official "upgraded" form): p = softmax(mean_l logits)_a, the K = 5·k
  patches of highest p, k-means (k = 20) on their layer-concatenated embeddings, the mean of each cluster
  over its members and layers, c_hsf = normalize(mean over clusters); g = normalize(0.2·c_hsf + 0.8·c');
* image score: softmax(100·⟨g, t⟩)_a.

Training (official ``AdaCLIP_Trainer.train_one_batch``): per layer focal(P_l) + dice(P_l,a, mask) +
dice(P_l,n, 1 − mask) on the per-layer softmax of the upsampled logits, plus focal on the image
probabilities [1 − s, s]; AdamW lr 0.01, betas (0.5, 0.999), 5 epochs.

Departures (see docs/methods/adaclip.md): any batch size (the official code runs batch 1 only); k-means
is seeded (``kmeans_seed``; the official one is not, so its scores vary run to run) and k is capped at
the number of selected patches; the text prompts have the text tower's width (official: the joint
embedding width, equal for the official backbones). ``official_compat=True`` rounds the prompt tokens
through fp16 as the official prompt layers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from anomalens.backbones import ClipBackbone
from anomalens.data.types import Sample
from anomalens.losses import dice_loss, focal_loss
from anomalens.methods.base import BatchPrediction, Method, Stage, TrainBatch, TrainConfig, register
from anomalens.ops import anchor_logits, gaussian_blur

# The official prompt ensemble (``TextEmbebddingLayer``): states × templates per side.
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
)
PROMPT_TYPES = ("S", "D", "SD")
PROMPT_BRANCHES = ("V", "L", "VL")


@dataclass(frozen=True)
class AdaClipConfig:
    """Options of `AdaClip` (serialised into checkpoints); defaults = the official ``train.py`` / ``test.py``.

    Attributes:
        image_size: input side S (official 518).
        layers: 1-based blocks (written for ``ref_depth``) whose patch tokens are scored (official
            depth/4 · [1, 2, 3, 4]); mapped to the backbone's depth.
        ref_depth: depth ``layers`` are written for.
        prompt_length: n, prompt tokens per prompted block.
        prompt_depth: J, blocks 1..J of the image tower and 2..J of the text tower are prompted.
        prompt_type: "S" static, "D" dynamic, "SD" hybrid.
        prompt_branch: "V" image tower, "L" text tower, "VL" both.
        use_hsf: hybrid semantic fusion for the image score (else the projected CLS alone).
        k_clusters: k of HSF's k-means; 5·k patches are clustered.
        hsf_alpha: weight of the HSF centre in the image embedding (official 0.2).
        kmeans_seed: random state of the k-means initialisation.
        scale: logit scale of the cosine similarities (official 100).
        sigma: Gaussian σ of the map smoothing, pixels at S (official 4).
        official_compat: round prompt tokens through fp16 as the official prompt layers do.
    """

    image_size: int | None = 518
    layers: tuple[int, ...] = (6, 12, 18, 24)
    ref_depth: int = 24
    prompt_length: int = 5
    prompt_depth: int = 4
    prompt_type: str = "SD"
    prompt_branch: str = "VL"
    use_hsf: bool = True
    k_clusters: int = 20
    hsf_alpha: float = 0.2
    kmeans_seed: int = 0
    scale: float = 100.0
    sigma: float = 4.0
    official_compat: bool = False


@dataclass(frozen=True)
class AdaClipSchedule:
    """Training-stage defaults: 5 epochs, batch 1, AdamW(0.5, 0.999) at lr 0.01, weight decay 0.01."""

    prompts: TrainConfig = TrainConfig(
        epochs=5, batch_size=1, lr=0.01, optimizer="adamw", betas=(0.5, 0.999), weight_decay=0.01
    )


# ---------------------------------------------------------------------- equations
def class_prompts(class_name: str) -> tuple[list[str], list[str]]:
    """The official ensemble sentences of one class (normal, anomalous); '-' in the name becomes ' '."""
    name = class_name.replace("-", " ")
    sides = []
    for states in (NORMAL_STATES, ANOMALOUS_STATES):
        sides.append([t.format(s.format(name)) for s in states for t in TEMPLATES])
    return sides[0], sides[1]


def hybrid_prompts(static: torch.Tensor | None, dynamic: torch.Tensor | None) -> torch.Tensor:
    """Hybrid prompt tokens of one block: static (n, D) + dynamic (B, n, D); either may be absent.

    Returns:
        (B, n, D), or (n, D) with static prompts alone.
    """
    if dynamic is None:
        return static
    return dynamic if static is None else dynamic + static


def layer_maps(logits: list[torch.Tensor], grid: tuple[int, int], size: int) -> torch.Tensor:
    """Per-layer logits (B, N, 2) → (L, B, 2, S, S) upsampled bilinearly with align_corners=True."""
    maps = []
    for x in logits:
        x = x.transpose(1, 2).unflatten(-1, grid)  # (B, 2, gh, gw)
        maps.append(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True))
    return torch.stack(maps)


def anomaly_map(logits: list[torch.Tensor], grid: tuple[int, int], size: int) -> torch.Tensor:
    """Test-time map: P = softmax(mean_l up(logits_l)), map = (P_a + 1 − P_n)/2 → (B, S, S)."""
    probs = layer_maps(logits, grid, size).mean(dim=0).softmax(dim=1)  # (B, 2, S, S)
    return (probs[:, 1] + 1.0 - probs[:, 0]) / 2.0


def hsf_embedding(
    features: list[torch.Tensor], logits: list[torch.Tensor], k_clusters: int, seed: int
) -> torch.Tensor:
    """Hybrid semantic fusion (official "upgraded" form): the mean of the k-means cluster centres of the
    5·k most anomalous patches.

    p = softmax(mean_l logits_l)_a; the K = min(N, 5k) patches of highest p; k-means (k' = min(k, K)
    clusters, k-means++ seeded with ``seed``) on their layer-concatenated embeddings [z_1 … z_L] (K, L·E);
    centre_c = mean of z_l,j over layers l and members j of cluster c; result normalize(mean_c centre_c).
    The cluster assignment carries no gradient; the centres do.

    Args:
        features: per layer (B, N, E) unit-norm patch embeddings.
        logits: per layer (B, N, 2) logits.

    Returns:
        (B, E) unit norm.
    """
    p = torch.stack(logits).mean(dim=0).softmax(dim=-1)[..., 1]  # (B, N)
    k = min(p.shape[1], 5 * k_clusters)
    top = p.topk(k, dim=1).indices  # (B, K)
    selected = torch.stack([z.gather(1, top[..., None].expand(-1, -1, z.shape[-1])) for z in features])
    # selected: (L, B, K, E)
    clusters = min(k_clusters, k)
    centres = []
    for b in range(p.shape[0]):
        data = selected[:, b].transpose(0, 1).flatten(1)  # (K, L·E)
        kmeans = KMeans(n_clusters=clusters, n_init="auto", random_state=seed)
        labels = torch.from_numpy(kmeans.fit_predict(data.detach().float().cpu().numpy()).astype(np.int64))
        labels = labels.to(p.device)
        members = F.one_hot(labels, clusters).to(selected.dtype)  # (K, C)
        sums = torch.einsum("kc,lke->ce", members, selected[:, b])  # (C, E)
        counts = members.sum(dim=0)[:, None] * selected.shape[0]  # (C, 1)
        centres.append((sums / counts).mean(dim=0))  # (E,)
    return F.normalize(torch.stack(centres), dim=-1)


def image_embedding(cls: torch.Tensor, hsf: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """g = normalize(α·c_hsf + (1 − α)·c') with unit-norm (B, E) inputs; g = c' without HSF."""
    return cls if hsf is None else F.normalize(alpha * hsf + (1.0 - alpha) * cls, dim=-1)


def pixel_loss(logits: torch.Tensor, grid: tuple[int, int], masks: torch.Tensor) -> torch.Tensor:
    """One layer's segmentation loss: focal(P) + dice(P_a, mask) + dice(P_n, 1 − mask), with P the softmax
    of the logits (B, N, 2) upsampled to the masks' (B, S, S) size (bilinear, align_corners=True)."""
    probs = layer_maps([logits], grid, masks.shape[-1])[0].softmax(dim=1)  # (B, 2, S, S)
    return focal_loss(probs, masks) + dice_loss(probs[:, 1], masks) + dice_loss(probs[:, 0], 1.0 - masks)


# ---------------------------------------------------------------------- method
@dataclass
class Features:
    """Projected unit-norm image features: c' (B, E), per-layer patch embeddings (B, N, E), text (B, 2, E)."""

    cls: torch.Tensor
    patches: list[torch.Tensor]
    text: torch.Tensor


@register("adaclip")
class AdaClip(Method):
    """AdaCLIP: hybrid static + dynamic prompts in both CLIP towers, projection layers, HSF scoring."""

    config_class = AdaClipConfig
    schedule_class = AdaClipSchedule
    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    resize = "squash"
    pos_interp = "bicubic"

    def __init__(self, config: AdaClipConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        _check_config(config, backbone)
        self.layers = backbone.map_layers(config.layers, config.ref_depth)
        n, depth = config.prompt_length, config.prompt_depth
        static, dynamic = "S" in config.prompt_type, "D" in config.prompt_type
        visual, text = "V" in config.prompt_branch, "L" in config.prompt_branch
        width, text_width, embed = backbone.width, backbone.text_width, backbone.embed_dim

        def tokens(count: int, dim: int) -> nn.ParameterList:
            return nn.ParameterList(nn.Parameter(torch.randn(n, dim) * 0.02) for _ in range(count))

        # Static prompts of image blocks 1..J and text blocks 2..J (the official text layer 1 has none).
        self.static_visual = tokens(depth, width) if static and visual else None
        self.static_text = tokens(depth - 1, text_width) if static and text else None
        self.dynamic_visual = nn.Linear(embed, n * width) if dynamic and visual else None
        self.dynamic_text = nn.Linear(embed, n * text_width) if dynamic and text else None
        self.patch_projections = nn.ModuleList(nn.Linear(width, embed) for _ in self.layers)
        self.cls_projection = nn.Linear(embed, embed)

    # ------------------------------------------------------------------ prompts
    def _round(self, prompts: dict[int, torch.Tensor], rows: int) -> dict[int, torch.Tensor]:
        """Each prompt expanded to (rows, n, D), through fp16 with ``official_compat`` (the official
        prompt layers round each row's tokens, so gradients are rounded per row before summing)."""
        expanded = {j: p.expand(rows, -1, -1) for j, p in prompts.items()}
        if not self.config.official_compat:
            return expanded
        return {j: p.half().float() for j, p in expanded.items()}

    def visual_prompts(self, dynamic: torch.Tensor | None, batch: int) -> dict[int, torch.Tensor]:
        """{block: (B, n, width)} hybrid prompts of image blocks 1..J."""
        if "V" not in self.config.prompt_branch:
            return {}
        depth = self.config.prompt_depth
        static = list(self.static_visual) if self.static_visual is not None else [None] * depth
        return self._round({j: hybrid_prompts(s, dynamic) for j, s in enumerate(static, start=1)}, batch)

    def text_prompts(self, dynamic: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """{text block: (B, n, text_width) or (n, text_width)} hybrid prompts of text blocks 2..J."""
        if "L" not in self.config.prompt_branch:
            return {}
        depth = self.config.prompt_depth
        static = list(self.static_text) if self.static_text is not None else [None] * (depth - 1)
        return {j: hybrid_prompts(s, dynamic) for j, s in enumerate(static, start=2)}

    def text_features(self, class_names: list[str], dynamic: torch.Tensor | None) -> torch.Tensor:
        """Unit-norm [t_n, t_a] per image (B, 2, E): the prompted ensemble of each image's class.

        With dynamic text prompts every image has its own prompts, so each image's sentences run through
        the text tower with them; otherwise the anchors are shared per class (cached at inference).
        """
        learned = list(self.static_text) if self.static_text is not None else []
        if dynamic is None and not (learned and torch.is_grad_enabled()):
            return self.cached_anchors(class_names, lambda names: self._encode(names, None), learned)
        return self._encode(class_names, dynamic)

    def _encode(self, class_names: list[str], dynamic: torch.Tensor | None) -> torch.Tensor:
        """(C, 2, E) anchors of ``class_names`` (C = B with ``dynamic`` (B, n, text_width))."""
        sides = [class_prompts(name) for name in class_names]
        counts = (len(sides[0][0]), len(sides[0][1]))
        tokens = self.backbone.tokenize([s for normal, anomalous in sides for s in normal + anomalous])
        per_name = sum(counts)  # sentences per name
        deep = self.text_prompts(dynamic)
        if dynamic is not None:  # one prompt set per image, repeated over its sentences
            deep = {j: p.repeat_interleave(per_name, dim=0) for j, p in deep.items()}  # (C·P, n, Dt)
        deep = self._round(deep, len(tokens))  # (C·P, n, Dt)
        text = self.backbone.encode_text(tokens, deep_prompts=deep).view(len(class_names), per_name, -1)
        normal, anomalous = text.split(counts, dim=1)  # (C, P_n, E), (C, P_a, E)
        return torch.stack([F.normalize(s.mean(dim=1), dim=-1) for s in (normal, anomalous)], dim=1)

    # ------------------------------------------------------------------ features
    def features(self, images: torch.Tensor, class_names: list[str]) -> Features:
        """Projected image features and the text anchors of (B, 3, S, S) images."""
        bb, n = self.backbone, self.config.prompt_length
        dyn_visual = dyn_text = None
        if self.dynamic_visual is not None or self.dynamic_text is not None:
            with torch.no_grad():
                frozen = bb.encode_image(images, cls_only=True).cls  # (B, E) the unprompted CLIP c
            if self.dynamic_visual is not None:
                dyn_visual = self.dynamic_visual(frozen).view(-1, n, bb.width)  # (B, n, width)
            if self.dynamic_text is not None:
                dyn_text = self.dynamic_text(frozen).view(-1, n, bb.text_width)  # (B, n, Dt)
        out = bb.encode_image(
            images, layers=self.layers, prompts=self.visual_prompts(dyn_visual, len(images))
        )
        patches = [
            F.normalize(proj(out.tokens[layer][:, 1:]), dim=-1)  # (B, N, E)
            for proj, layer in zip(self.patch_projections, self.layers, strict=True)
        ]
        cls = F.normalize(self.cls_projection(out.cls), dim=-1)  # (B, E)
        return Features(cls, patches, self.text_features(class_names, dyn_text))

    def scores_and_logits(self, feats: Features) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image logits (B, 2) of g and per-layer patch logits (B, N, 2)."""
        config = self.config
        logits = [anchor_logits(z, feats.text, config.scale) for z in feats.patches]
        hsf = (
            hsf_embedding(feats.patches, logits, config.k_clusters, config.kmeans_seed)
            if config.use_hsf
            else None
        )
        g = image_embedding(feats.cls, hsf, config.hsf_alpha)  # (B, E)
        return anchor_logits(g, feats.text, config.scale), logits

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def forward_batch(self, images: torch.Tensor, class_names: list[str], support: Any) -> BatchPrediction:
        """(B, 3, S, S) → image scores softmax(100·⟨g, t⟩)_a (B,) and smoothed maps (B, S, S)."""
        feats = self.features(images, class_names)
        image_logits, logits = self.scores_and_logits(feats)
        maps = anomaly_map(logits, self.backbone.grid, self.backbone.image_size)  # (B, S, S)
        return BatchPrediction(image_logits.softmax(dim=-1)[:, 1], gaussian_blur(maps, self.config.sigma))

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Official loss: focal([1 − s, s], label) + Σ_l [focal(P_l) + dice(P_l,a) + dice(P_l,n, 1 − mask)].

        Pixel terms use only the images with pixel ground truth (`TrainBatch.has_mask`).
        """
        feats = self.features(batch.images, batch.class_names)
        image_logits, logits = self.scores_and_logits(feats)
        image = focal_loss(image_logits.softmax(dim=-1), batch.labels)
        pixel = batch.images.new_zeros(())
        keep = batch.has_mask
        if keep.any():
            for x in logits:
                pixel = pixel + pixel_loss(x[keep], self.backbone.grid, batch.masks[keep])
        return {"loss": image + pixel, "image": image.detach(), "pixel": pixel.detach()}

    def collate(self, samples: list[Sample], augment: bool) -> TrainBatch:
        """`Method.collate` with the official mask resizing: bilinear, then > 0.5."""
        batch = super().collate(samples, augment)
        for i, s in enumerate(samples):
            if s.mask is not None:
                batch.masks[i] = self.backbone.preprocess_masks([s.mask], self.resize, mode="bilinear")[0]
        return batch

    def learned_parameters(self) -> list[nn.Parameter]:
        """Prompts, prompt generators and projections; the backbone stays frozen."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def training_stages(self) -> list[Stage]:
        return [Stage("prompts", self.learned_parameters, self.training_loss, self.schedule.prompts)]


def _check_config(config: AdaClipConfig, backbone: ClipBackbone) -> None:
    """Clear errors for option values the method cannot run with."""
    problems = []
    if config.prompt_type not in PROMPT_TYPES:
        problems.append(f"prompt_type must be one of {PROMPT_TYPES}, got {config.prompt_type!r}")
    if config.prompt_branch not in PROMPT_BRANCHES:
        problems.append(f"prompt_branch must be one of {PROMPT_BRANCHES}, got {config.prompt_branch!r}")
    if config.prompt_length < 1:
        problems.append("prompt_length must be >= 1")
    if not 2 <= config.prompt_depth <= min(backbone.depth, backbone.text_depth):
        problems.append(
            f"prompt_depth must be in 2..{min(backbone.depth, backbone.text_depth)} for {backbone.name}"
        )
    if not config.layers:
        problems.append("layers must name at least one block")
    if config.k_clusters < 1:
        problems.append("k_clusters must be >= 1")
    if problems:
        raise ValueError("adaclip: " + "; ".join(problems))
