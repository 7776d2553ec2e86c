"""Crane (Salehi et al., "Crane: Context-Guided Prompt Learning and Attention Refinement for Zero-Shot
Anomaly Detections", paper 003), with the facts of the MIT official code (AlirezaSalehy/Crane at 39181f9).

A frozen CLIP ViT gives three kinds of visual features in one forward pass:

* the global embedding g_i = normalize(ln_post(CLS) @ proj) of the unchanged CLIP path (§3.1);
* E-Attn (§3.1): from block ``eattn_start`` (6 of 24) on, a parallel branch whose attention weights are
  W_l = A(Q_l) + A(K_l) + A(V_l), A(E) = softmax(E Eᵀ · head_dim^-0.5) per head (a *sum*, not a mean),
  applied to V_l and the block's out-projection, no FFN; the branch accumulates Z = x_5 + Σ_l H_l and
  is read after each layer of ``layers`` (the backbone's `EAttnSpec` dual path);
* D-Attn (§3.1, optional): DINOv2 patch cosine similarities S of the same image,
  W = softmax((S − β·mean S)·γ + M), M = −∞ where the shifted value is < ε (`attention.dattn_weights`),
  applied to the values of CLIP block l (CLS dropped, resampled to the DINO grid) and block l's
  out-projection, no residual (`ClipBackbone.attention_output`).

Every branch token goes through ``ln_post`` and ``proj`` and is L2-normalised. The text side learns two
prompts "[X]×12 object." / "[X]×12 damaged object." (12 context vectors each, N(0, 0.02)) and 4 deep
tokens that replace sequence positions 1–4 at the input of text layers 2–9 (§3.1 "Text Encoder"); during
training the image embedding g_i is inserted as one more token after the context vectors
(context-guided prompt learning). Then:

* Eq. (1): p_a(e, G) = softmax([⟨e, g_n⟩, ⟨e, g_a⟩] / τ)_a with τ = 0.07 (official; the paper says 100);
* §4 maps: each branch's logits upsampled (bilinear) to S, averaged over branches (mean of softmaxes with
  ``soft_mean``, else softmax of the mean logits), Gaussian σ = 4 (scipy "reflect" borders);
* §3.2 score-based pooling (official form): Z̄ = mean over branches of the normalised patch features,
  p̄ = p_a of the mean branch logits, g_a = normalize(Σ_j p̄_j Z̄_j), g⁺ = normalize(½ g_a + ½ g_i);
  §4 image score ŷ = p_a(g⁺);
* §3.3 loss (official weights): Σ_branches [2·focal(P) + 2·dice((1 − p_n + p_a)/2, mask)] on the
  nearest-upsampled probabilities, + 0.2·CE of the image logits of g⁺ at τ = 0.01.

`official_compat=True` reproduces the official code's aliasing of E-Attn taps (every tap holds the last
layer's value), its D-Attn values read at the mid-block state (after attention, before the MLP), its
batch-wide mean of S, and its fp16 rounding of the deep prompts. See ``docs/methods/crane.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import DEFAULT_DINO, TEST_TINY_DINO, ClipBackbone, EAttnSpec, load_dino, map_layer
from anomalens.backbones.attention import (
    EATTN_VARIANTS,
    cosine_similarity_matrix,
    dattn_weights,
    resample_grid,
)
from anomalens.backbones.registry import WeightsUnavailableError, resolve_timm_pretrained
from anomalens.data.types import Sample
from anomalens.losses import dice_loss, focal_loss
from anomalens.methods.base import DEFAULT, BatchPrediction, Method, Stage, TrainBatch, TrainConfig, register
from anomalens.ops import anchor_logits, anchor_probability, gaussian_blur
from anomalens.prompts import OBJECT_AGNOSTIC_ANOMALOUS, OBJECT_AGNOSTIC_NORMAL

# The official `attn_type` names of the E-Attn variants, accepted as aliases of ours.
OFFICIAL_ATTN_TYPES = {"qq+kk+vv": "qkv"}
SCORE_POOLING = ("official", "paper", "none")
CONTEXT_POSITIONS = ("after_ctx", "after_name")
TRAIN_UPSAMPLING = ("nearest", "bilinear")
AGNOSTIC_CLASS = "object"  # the one key of the learned-prompt text cache (`Crane.static_text`)


@dataclass(frozen=True)
class CraneConfig:
    """Options of `Crane` (serialised into checkpoints). Defaults = the official "Crane" configuration;
    `CONFIGURATIONS` ["crane+"] holds the "Crane+" one (D-Attn with DINOv2, layer 24).

    Attributes:
        image_size: input side S (official 518 for ViT-L-14-336).
        layers: 1-based blocks (written for ``ref_depth``) whose E-Attn branch is read and where D-Attn
            runs (official ``features_list``); mapped to the backbone's depth.
        ref_depth: depth ``layers`` and ``eattn_start`` are written for.
        eattn_start: first block of the E-Attn branch (official blocks 6–24 of 24).
        attn_variant: summed self-correlation terms of E-Attn: "qkv" (Crane), "qq", "kk", "vv", "qq+kk",
            "qq+vv", "kk+vv" (Table 3.c); the official name "qq+kk+vv" is accepted for "qkv".
        use_eattn: E-Attn branches (Table 3.d).
        use_dattn: D-Attn branches; needs DINO weights (Crane+).
        dino: timm name of the DINO model (`load_dino`), or "test-tiny-dino".
        dino_pretrained: its weights: "default" (timm's weights of ``dino``; random for test-tiny-dino),
            "timm", a local file, or None (random).
        dattn_beta, dattn_gamma, dattn_eps: D-Attn shift β, scale γ and mask threshold ε.
        n_ctx: learnable context vectors per prompt (E).
        deep_prompt_length: deep text tokens per layer (M).
        deep_prompt_depth: deep tokens replace positions 1..M at the input of text layers 2..depth
            (official ``depth`` = 9 of 12: 8 tensors), mapped from ``text_ref_depth``.
        text_ref_depth: text depth ``deep_prompt_depth`` is written for.
        context_in_training: insert g_i into the prompts during training (official prob 1).
        context_at_test: insert g_i at inference too (official default: off).
        context_position: "after_ctx" (official: right after the context vectors) or "after_name" (the
            paper: after "object" / "damaged object", before the period).
        score_pooling: "official", "paper" (per-branch p-weighted means, averaged, (g_i + ḡ_a)/2) or
            "none" (image score from g_i; Table 3.a).
        pooling_weight: weight of g_a in g⁺ (official 0.5).
        soft_mean: maps as the mean of per-branch softmaxes (True) or the softmax of mean logits.
        temperature: τ of Eq. (1) for maps, pooling and the image score.
        train_image_temperature: τ of the image-level CE in training (official 0.01).
        sigma: Gaussian smoothing of the maps in pixels at S (0 disables it).
        train_upsampling: upsampling of the probabilities in the pixel losses (official "nearest").
        focal_weight, dice_weight, image_weight: loss weights (official 2, 2, 0.2).
        official_compat: reproduce the official code's defects (see the module docstring).
    """

    image_size: int | None = 518
    layers: tuple[int, ...] = (6, 12, 18, 24)
    ref_depth: int = 24
    eattn_start: int = 6
    attn_variant: str = "qkv"
    use_eattn: bool = True
    use_dattn: bool = False
    dino: str = DEFAULT_DINO
    dino_pretrained: str | None = "default"
    dattn_beta: float = 1.2
    dattn_gamma: float = 3.0
    dattn_eps: float = 0.0
    n_ctx: int = 12
    deep_prompt_length: int = 4
    deep_prompt_depth: int = 9
    text_ref_depth: int = 12
    context_in_training: bool = True
    context_at_test: bool = False
    context_position: str = "after_ctx"
    score_pooling: str = "official"
    pooling_weight: float = 0.5
    soft_mean: bool = True
    temperature: float = 0.07
    train_image_temperature: float = 0.01
    sigma: float = 4.0
    train_upsampling: str = "nearest"
    focal_weight: float = 2.0
    dice_weight: float = 2.0
    image_weight: float = 0.2
    official_compat: bool = False


@dataclass(frozen=True)
class CraneSchedule:
    """Training-stage defaults (official `train.py:68,184-193`): 5 epochs, batch 8, Adam(0.6, 0.999) at
    lr 1e-3."""

    prompts: TrainConfig = TrainConfig(epochs=5, batch_size=8, lr=1e-3, betas=(0.6, 0.999))


# The two official configurations (reproduce.sh): options to pass to `create("crane", **...)`.
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "crane": {"use_dattn": False, "layers": (6, 12, 18, 24), "soft_mean": True},
    "crane+": {"use_dattn": True, "layers": (24,), "soft_mean": False},
}


# ---------------------------------------------------------------------- equations
def grid_to_image(values: torch.Tensor, grid: tuple[int, int], size: int, mode: str) -> torch.Tensor:
    """Per-patch values (B, N, C) on a ``grid`` → (B, C, size, size) (official ``regrid_upsample``).

    ``mode`` "bilinear" (align_corners=False, inference) or "nearest" (official training default).
    """
    x = values.transpose(1, 2).unflatten(-1, grid)  # (B, C, gh, gw)
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False)


def anomaly_map(
    logits: list[torch.Tensor], grid: tuple[int, int], size: int, soft_mean: bool
) -> torch.Tensor:
    """§4: average of the branches' maps at the input resolution (before smoothing).

    ``soft_mean``: mean over branches of the upsampled per-branch softmax (official "Crane"); otherwise
    softmax of the mean of the upsampled logits (official test.py default). Anomalous channel.

    Args:
        logits: per branch (B, N, 2) logits of Eq. (1) on a common ``grid``.
        size: output side S.

    Returns:
        (B, S, S) probabilities of "anomalous".
    """
    if soft_mean:
        maps = [grid_to_image(x.softmax(dim=-1), grid, size, "bilinear") for x in logits]  # (B, 2, S, S)
        return torch.stack(maps).mean(dim=0)[:, 1]
    mean_logits = torch.stack([grid_to_image(x, grid, size, "bilinear") for x in logits]).mean(dim=0)
    return mean_logits.softmax(dim=1)[:, 1]


def score_based_pooling(
    features: list[torch.Tensor],
    logits: list[torch.Tensor],
    global_embedding: torch.Tensor,
    mode: str = "official",
    weight: float = 0.5,
) -> torch.Tensor:
    """§3.2: the anomaly-aware global embedding g⁺ (unit norm).

    "official" (code): Z̄ = mean_b Z_b, p̄ = softmax(mean_b logits_b)_a,
    g_a = normalize(Σ_j p̄_j Z̄_j), g⁺ = normalize(w·g_a + (1 − w)·g_i).
    "paper": g_a^b = Σ_j p_bj Z_bj / Σ_j p_bj per branch, ḡ_a = mean_b g_a^b,
    g⁺ = normalize(w·ḡ_a + (1 − w)·g_i) (w = ½: the paper's (g_i + ḡ_a)/2; unit vs non-unit g_a gives a
    different mix than the code). "none": g⁺ = g_i (Table 3.a without pooling).

    Args:
        features: per branch (B, N, E) unit-norm patch embeddings (same N for all branches).
        logits: per branch (B, N, 2) logits of Eq. (1).
        global_embedding: (B, E) unit-norm g_i.

    Returns:
        (B, E).
    """
    if mode == "none":
        return global_embedding
    if mode == "official":
        mean_features = torch.stack(features).mean(dim=0)  # (B, N, E)
        p = torch.stack(logits).mean(dim=0).softmax(dim=-1)[..., 1:]  # (B, N, 1)
        pooled = F.normalize((p * mean_features).sum(dim=1), dim=-1)  # (B, E)
    elif mode == "paper":
        per_branch = []
        for z, x in zip(features, logits, strict=True):
            p = x.softmax(dim=-1)[..., 1:]  # (B, N, 1)
            per_branch.append((p * z).sum(dim=1) / p.sum(dim=1))  # (B, E)
        pooled = torch.stack(per_branch).mean(dim=0)  # (B, E)
    else:
        raise ValueError(f"score_pooling must be one of {SCORE_POOLING}, got {mode!r}")
    return F.normalize(weight * pooled + (1.0 - weight) * global_embedding, dim=-1)


def insert_context_token(
    embeddings: torch.Tensor, tokens: torch.Tensor, context: torch.Tensor, positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-guided prompts (§3.1): insert g_i as one token embedding at ``positions[c]`` of prompt c.

    The sequence keeps its length (the last position, padding, is dropped); the token ids repeat the id
    at the insertion point so that the EOT position (argmax of the ids) moves by one, as in the official
    ``_pad_and_concatenate_suffix``.

    Args:
        embeddings: (C, L, D) prompt embeddings.
        tokens: (C, L) token ids.
        context: (B, D) image embeddings g_i.
        positions: per prompt, the index the new token takes.

    Returns:
        (B, C, L, D) embeddings and (C, L) ids.
    """
    b = context.shape[0]
    rows, ids = [], []
    for c, p in enumerate(positions):
        e = embeddings[c].expand(b, -1, -1)  # (B, L, D)
        rows.append(torch.cat([e[:, :p], context[:, None].to(e.dtype), e[:, p:-1]], dim=1))  # (B, L, D)
        ids.append(torch.cat([tokens[c, :p], tokens[c, p : p + 1], tokens[c, p:-1]]))  # (L,)
    return torch.stack(rows, dim=1), torch.stack(ids)


def pixel_losses(
    logits: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int], mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """§3.3 L_local of one branch (official form): focal on the upsampled [p_n, p_a] and one Dice on
    (1 − p_n + p_a)/2 against the mask.

    Args:
        logits: (B, N, 2) logits of Eq. (1).
        masks: (B, S, S) 0/1.
        mode: upsampling of the probabilities ("nearest" official, or "bilinear").

    Returns:
        (focal, dice) scalars.
    """
    probs = grid_to_image(logits.softmax(dim=-1), grid, masks.shape[-1], mode)  # (B, 2, S, S)
    whole = (1.0 - probs[:, 0] + probs[:, 1]) / 2.0  # (B, S, S)
    return focal_loss(probs, masks), dice_loss(whole, masks)


# ---------------------------------------------------------------------- method
@dataclass
class VisualFeatures:
    """What the image side gives: unit-norm g_i (B, E) and per-branch unit-norm patch embeddings
    (B, N, E) on ``grid`` (the DINO grid when D-Attn runs, else the CLIP grid)."""

    global_embedding: torch.Tensor
    branches: list[torch.Tensor]
    grid: tuple[int, int]


@register("crane")
class Crane(Method):
    """Crane / Crane+: E-Attn and D-Attn dense branches, context-guided learnable prompts."""

    config_class = CraneConfig
    schedule_class = CraneSchedule
    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    resize = "squash"
    pos_interp = "bilinear"

    def __init__(self, config: CraneConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        _check_config(config, backbone)
        self.layers = backbone.map_layers(config.layers, config.ref_depth)
        self.eattn_start = map_layer(config.eattn_start, backbone.depth, config.ref_depth)
        self.attn_variant = OFFICIAL_ATTN_TYPES.get(config.attn_variant, config.attn_variant)
        if config.use_eattn and min(self.layers) < self.eattn_start:
            raise ValueError(
                f"crane: layers {self.layers} must not precede eattn_start {self.eattn_start} "
                f"(1-based, after mapping to {backbone.depth} blocks)"
            )
        if config.official_compat and config.use_dattn and self.eattn_start in self.layers:
            raise ValueError(
                "crane: official_compat cannot reproduce D-Attn at the first E-Attn block "
                "(the official code reads the E-Attn branch there)"
            )
        self.dino = (
            load_dino(config.dino, _dino_weights(config), device=backbone.device)
            if config.use_dattn
            else None
        )
        last = map_layer(config.deep_prompt_depth, backbone.text_depth, config.text_ref_depth)
        self.deep_layers = list(range(2, last + 1))
        width = backbone.text_width
        self.ctx_normal = nn.Parameter(torch.randn(config.n_ctx, width) * 0.02)
        self.ctx_anomalous = nn.Parameter(torch.randn(config.n_ctx, width) * 0.02)
        self.deep_prompts = nn.ParameterList(
            nn.Parameter(torch.randn(config.deep_prompt_length, width) * 0.02) for _ in self.deep_layers
        )
        words = (OBJECT_AGNOSTIC_NORMAL, OBJECT_AGNOSTIC_ANOMALOUS)
        prompts = [" ".join(["X"] * config.n_ctx + [w]) + "." for w in words]
        self.register_buffer("prompt_tokens", backbone.tokenize(prompts), persistent=False)  # (2, L)

    @classmethod
    def build(
        cls,
        backbone: str | None = None,
        pretrained: str | None = DEFAULT,
        device: str = "auto",
        **options: Any,
    ) -> Crane:
        """`Method.build`, failing within seconds when D-Attn's DINO weights are missing (before the
        CLIP weights are read)."""
        config = cls.make_config(**options)
        if config.use_dattn and config.dino != TEST_TINY_DINO:
            try:
                resolve_timm_pretrained(config.dino, _dino_weights(config))
            except WeightsUnavailableError as e:
                raise WeightsUnavailableError(
                    f"Crane+ (use_dattn=True) needs DINO weights: {e} For DINO give the file as "
                    f"dino_pretrained=/path (CLI: --set dino_pretrained=/path). Or use use_dattn=False "
                    f"(Crane without D-Attn), which needs no DINO."
                ) from None
        return super().build(backbone, pretrained, device, **options)

    # ------------------------------------------------------------------ text
    def text_features(self, context: torch.Tensor | None) -> torch.Tensor:
        """Unit-norm [g_n, g_a] from the learnable prompts: (1, 2, E), or (B, 2, E) with image context
        ``context`` (B, E) inserted (context-guided prompt learning, §3.1)."""
        n = self.config.n_ctx
        tokens = self.prompt_tokens  # (2, L)
        with torch.no_grad():
            base = self.backbone.token_embeddings(tokens)  # (2, L, Dt)
        ctx = torch.stack([self.ctx_normal, self.ctx_anomalous]).to(base.dtype)  # (2, n, Dt)
        embeddings = torch.cat([base[:, :1], ctx, base[:, 1 + n :]], dim=1)  # (2, L, Dt)
        deep = {
            layer: p.half().float() if self.config.official_compat else p
            for layer, p in zip(self.deep_layers, self.deep_prompts, strict=True)
        }
        if context is None:
            text = self.backbone.encode_text(tokens, prompt_embeddings=embeddings, deep_prompts=deep)
            return text[None]  # (1, 2, E)
        if self.config.context_position == "after_ctx":
            positions = [1 + n, 1 + n]
        else:  # before the period, which precedes EOT
            positions = [int(i) - 1 for i in tokens.argmax(dim=-1)]
        embeddings, tokens = insert_context_token(embeddings, tokens, context, positions)  # (B, 2, L, Dt)
        b = context.shape[0]
        text = self.backbone.encode_text(
            tokens.repeat(b, 1), prompt_embeddings=embeddings.flatten(0, 1), deep_prompts=deep
        )  # (B*2, E)
        return text.view(b, 2, -1)

    @torch.no_grad()
    def static_text(self) -> torch.Tensor:
        """`text_features(None)` (1, 2, E), cached while the prompt weights are unchanged (their
        `weights_fingerprint`; training steps and loading a checkpoint change it). The learned prompts
        are object-agnostic, so one cache entry serves every class."""
        compute = lambda _: self.text_features(None)  # noqa: E731  # (1, 2, E) for the one entry
        return self.cached_anchors([AGNOSTIC_CLASS], compute, self.prompt_parameters())

    # ------------------------------------------------------------------ image
    @torch.no_grad()
    def visual_features(self, images: torch.Tensor) -> VisualFeatures:
        """g_i and the E-Attn / D-Attn branches of (B, 3, S, S) images, in one CLIP forward pass.

        Branch order follows the official code: for each layer, D-Attn then E-Attn.
        """
        config, bb = self.config, self.backbone
        eattn = values_at = None
        grid = bb.grid
        if config.use_dattn:
            dino = self.dino.patch_features(images, bb.mean, bb.std)  # (B, dh, dw, C)
            grid = tuple(dino.shape[1:3])
            mean = "batch" if config.official_compat else "image"
            weights = dattn_weights(
                cosine_similarity_matrix(dino.flatten(1, 2)),
                config.dattn_beta,
                config.dattn_gamma,
                config.dattn_eps,
                mean,
            )  # (B, 1, N', N')
            # The official D-Attn reads V after the block's attention when the dual path runs there.
            values_at = {
                i: "mid" if config.official_compat and i > self.eattn_start else "input" for i in self.layers
            }
        if config.use_eattn:
            # Official snapshots alias the final branch, except when they are resampled to the DINO grid.
            alias = config.official_compat and tuple(grid) == tuple(bb.grid)
            eattn = EAttnSpec(self.eattn_start, self.attn_variant, tuple(self.layers), alias_taps=alias)
        cls_only = (values_at or {}).get(bb.depth) != "mid"  # only then the last block's tokens are read
        out = bb.encode_image(images, eattn=eattn, values_at=values_at, cls_only=cls_only)
        branches = []
        for layer in self.layers:
            if config.use_dattn:
                values = resample_grid(out.values[layer][:, :, 1:], bb.grid, grid)  # (B, heads, N', hd)
                branches.append(bb.attention_output(layer, weights, values))  # (B, N', width)
            if config.use_eattn:
                branches.append(resample_grid(out.branch[layer][:, 1:], bb.grid, grid))  # (B, N', width)
        features = [F.normalize(bb.project(t), dim=-1) for t in branches]  # (B, N', E) each
        return VisualFeatures(F.normalize(out.cls, dim=-1), features, tuple(grid))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def forward_batch(self, images: torch.Tensor, class_names: list[str], support: Any) -> BatchPrediction:
        """(B, 3, S, S) → image scores p_a(g⁺) (B,) and smoothed maps (B, S, S)."""
        config = self.config
        visual = self.visual_features(images)
        text = self.text_features(visual.global_embedding) if config.context_at_test else self.static_text()
        scale = 1.0 / config.temperature
        logits = [anchor_logits(z, text, scale) for z in visual.branches]  # Eq. (1): (B, N', 2)
        maps = anomaly_map(logits, visual.grid, self.backbone.image_size, config.soft_mean)  # (B, S, S)
        pooled = score_based_pooling(
            visual.branches, logits, visual.global_embedding, config.score_pooling, config.pooling_weight
        )  # (B, E)
        scores = anchor_probability(pooled, text, scale)  # (B,) p_a(g⁺)
        return BatchPrediction(scores, gaussian_blur(maps, config.sigma))

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """§3.3 (official weights): Σ_b [w_f·focal_b + w_d·dice_b] + w_i·CE(p(g⁺) at τ = 0.01).

        Pixel terms use only the images with pixel ground truth (`TrainBatch.has_mask`).
        """
        config = self.config
        visual = self.visual_features(batch.images)
        text = self.text_features(visual.global_embedding if config.context_in_training else None)
        logits = [anchor_logits(z, text, 1.0 / config.temperature) for z in visual.branches]
        keep = batch.has_mask
        focal = dice = batch.images.new_zeros(())
        if keep.any():
            for x in logits:
                f, d = pixel_losses(x[keep], batch.masks[keep], visual.grid, config.train_upsampling)
                focal, dice = focal + f, dice + d
        pooled = score_based_pooling(
            visual.branches, logits, visual.global_embedding, config.score_pooling, config.pooling_weight
        )
        image_logits = anchor_logits(pooled, text, 1.0 / config.train_image_temperature)  # (B, 2)
        ce = F.cross_entropy(image_logits, batch.labels)
        loss = config.focal_weight * focal + config.dice_weight * dice + config.image_weight * ce
        return {"loss": loss, "focal": focal.detach(), "dice": dice.detach(), "ce": ce.detach()}

    def collate(self, samples: list[Sample], augment: bool) -> TrainBatch:
        """`Method.collate` with Crane's mask resizing: bilinear, then > 0.5 (official dataset.py)."""
        batch = super().collate(samples, augment)
        for i, s in enumerate(samples):
            if s.mask is not None:
                batch.masks[i] = self.backbone.preprocess_masks([s.mask], self.resize, mode="bilinear")[0]
        return batch

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The learned prompt tensors (context vectors and deep tokens); the backbones stay frozen."""
        return [self.ctx_normal, self.ctx_anomalous, *self.deep_prompts]

    def training_stages(self) -> list[Stage]:
        return [Stage("prompts", self.prompt_parameters, self.training_loss, self.schedule.prompts)]


def _dino_weights(config: CraneConfig) -> str | None:
    """The DINO ``pretrained`` argument: "default" = timm's weights, random for test-tiny-dino."""
    if config.dino_pretrained == "default":
        return None if config.dino == TEST_TINY_DINO else "timm"
    return config.dino_pretrained


def _check_config(config: CraneConfig, backbone: ClipBackbone) -> None:
    """Clear errors for option values the method cannot run with."""
    variant = OFFICIAL_ATTN_TYPES.get(config.attn_variant, config.attn_variant)
    problems = []
    if not (config.use_eattn or config.use_dattn):
        problems.append("at least one of use_eattn / use_dattn must be True")
    if variant not in EATTN_VARIANTS:
        problems.append(f"attn_variant {config.attn_variant!r} not in {sorted(EATTN_VARIANTS)}")
    for name, value, valid in (
        ("score_pooling", config.score_pooling, SCORE_POOLING),
        ("context_position", config.context_position, CONTEXT_POSITIONS),
        ("train_upsampling", config.train_upsampling, TRAIN_UPSAMPLING),
    ):
        if value not in valid:
            problems.append(f"{name} must be one of {valid}, got {value!r}")
    if not config.layers:
        problems.append("layers must name at least one block")
    if config.n_ctx < 1 or config.deep_prompt_length < 1:
        problems.append("n_ctx and deep_prompt_length must be >= 1")
    if config.temperature <= 0 or config.train_image_temperature <= 0:
        problems.append("temperatures must be > 0")
    context = config.context_in_training or config.context_at_test
    if context and backbone.embed_dim != backbone.text_width:
        problems.append(
            f"image context needs embed_dim ({backbone.embed_dim}) == text width ({backbone.text_width}); "
            f"set context_in_training=False and context_at_test=False"
        )
    if problems:
        raise ValueError("crane: " + "; ".join(problems))
