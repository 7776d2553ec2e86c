"""AA-CLIP (Ma et al., "AA-CLIP: Enhancing Zero-Shot Anomaly Detection via Anomaly-Aware CLIP", CVPR 2025).

Paper 002 §3.2 (equations) and its supplement 004 (prompts, augmentation, optimiser), read as DESIGN §4
states them; facts checked against the official code (Mwxinnn/AA-CLIP at 53db195, Apache-2.0; see
``docs/methods/aa-clip.md`` for the file:line evidence and every choice):

* residual adapters (Eq. 1-2): ``x <- λ·Norm(LeakyReLU(W x)) + (1 − λ)·x`` after each of the first K
  blocks, on all tokens, with Norm = rescale to the token's own L2 norm (`NormMatchedResidualAdapter`);
  K_T = 3 text blocks (of 12), K_I = 6 visual blocks (of 24), λ = 0.1, mapped to the backbone's depth;
* stage 1 ("text"): text adapters + a learnable text projection that replaces CLIP's; anchors
  T_N, T_A = re-normalised means of the normalised prompt embeddings (supplement Table 5, class
  descriptions); reference patch features from a frozen pass whose blocks 6..24 use V-V attention,
  taps 6/12/18/24 through ``ln_post`` and ``proj``, normalised, plus the normalised CLS embedding;
  loss Eq. 4-6 = focal + dice(p_n, 1 − mask) + dice(p_a, mask) on the last tap (official; all taps and
  the image-level term of Eq. 4 are options) + γ·(mean_b ⟨T_N, T_A⟩)²;
* stage 2 ("image"): visual adapters, per-tap bias-free projectors after ``ln_post`` (Eq. 7; the
  official code sums the per-tap *maps*, the paper sums the *features*: `AACLIPConfig.patch_aggregation`),
  and the ``det`` branch = mean of the normalised projected last-tap patch tokens, CE against [T_N, T_A]
  without a logit scale;
* test: per tap (100·cos_a + 1 − 100·cos_n)/2, summed over taps, Gaussian-blurred on the patch grid
  (industrial k=7 σ=1, medical k=9 σ=1.5, reflect border), bilinear (align_corners=True) to S.

Scores. The tables use `AACLIP.set_scores` (per class over the evaluated set: pixel min-max over all
pixels of the class, per-image max, image term (det·T_A + 1)/2 min-maxed, averaged 0.5/0.5; medical:
pixel part only). ``predict`` returns the per-image (streaming) score, which needs no other image:
0.5·sigmoid(max_x m̄(x)) + 0.5·softmax([det·T_N, det·T_A])_a, m̄ = blurred tap-mean of the logit
difference 100·(cos_a − cos_n), i.e. the two probabilities the model is trained to output (medical:
the first only).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn

from anomalens.backbones import ClipBackbone, map_layer, map_layers
from anomalens.data.types import Sample
from anomalens.losses import dice_loss, focal_loss
from anomalens.methods.base import (
    BatchPrediction,
    Method,
    Prediction,
    Stage,
    TrainBatch,
    TrainConfig,
    register,
)
from anomalens.ops import anchor_logits, gaussian_blur
from anomalens.prompts import AA_CLIP, aa_clip_prompts, class_word, ensemble_text_features

# Input side of the paper (ViT-L/14 at 518 gives a 37×37 patch grid); other backbones default to
# their native size.
PAPER_IMAGE_SIZE = 518
# Reference depths of the paper's layer indices (ViT-L/14: 24 visual, 12 text blocks).
VISUAL_REF_DEPTH = 24
TEXT_REF_DEPTH = 12
# Official Gaussian blur of the test-time maps per domain: (kernel size, sigma).
BLUR = {"industrial": (7, 1.0), "medical": (9, 1.5)}
DOMAINS = tuple(BLUR)
AGGREGATIONS = ("maps", "features")
# Official augmentation (dataset/__init__.py): rotation ±π/6 in degrees, translation fraction, flips.
ROTATION_DEGREES = math.degrees(math.pi / 6)
TRANSLATE = 0.15
GEOMETRIC_P = 0.5
JITTER_STRENGTH = 0.5
JITTER_P = 0.7


@dataclass(frozen=True)
class AACLIPConfig:
    """Options of `AACLIP` (serialised verbatim into checkpoints and results).

    Layer indices are 1-based and written for the paper's ViT-L/14 (24 visual, 12 text blocks); they are
    mapped to the backbone's depth with `map_layer` (``round(i·d/24)``, at least 1).

    Attributes:
        image_size: input side S; None = 518 on ViT-L/14 backbones (the paper), else the native size.
        text_adapter_layers: K_T, adapters after text blocks 1..K_T (of 12).
        image_adapter_layers: K_I, adapters after visual blocks 1..K_I (of 24).
        text_lambda: λ of the text adapters (Eq. 2; official ``--text_adapt_weight``).
        image_lambda: λ of the visual adapters (official ``--image_adapt_weight``).
        taps: visual blocks whose patch tokens are used (Eq. 7's four granularities).
        vv_start: first block of the stage-1 reference pass that uses V-V attention (up to the last).
        disentangle_weight: γ of Eq. 6.
        logit_scale: temperature of the patch logits (official 100).
        projector_act: LeakyReLU after ``seg_proj``/``det_proj`` (official ``--relu``, off by default).
        patch_aggregation: "maps" (official: one map per tap, maps/losses summed) or "features" (paper
            Eq. 7: the normalised tap features are summed, one map).
        stage1_all_taps: stage-1 alignment loss summed over all taps (paper) instead of the last (official).
        stage1_image_loss: add Eq. 4's image-level term to stage 1 (paper; the official code has none):
            CE of ``logit_scale·cos(CLS, [T_N, T_A])`` against the label.
        adapt_text: use the stage-1 text adapters and projection; False = CLIP's own text tower (the
            official ``text_epoch 0`` path); then there is no stage 1.
        class_descriptions: fill the prompts with the class description table (official); False = the
            plain class name.
        domain: "industrial" or "medical": blur size and image score (medical: pixel part only).
        blur_kernel, blur_sigma: override the domain's Gaussian blur (odd kernel; sigma 0 = no blur).
        quick_gelu: the backbone's activation; False = exact GELU, as the official code runs the OpenAI
            weights (its checkpoints were trained so); None = what the weights were trained with.
        official_compat: reproduce official-code defects (see docs): the set-level min-max is skipped
            when a maximum is exactly 1, and the stage-1 V-V attention runs over the batch axis.
    """

    image_size: int | None = None
    text_adapter_layers: int = 3
    image_adapter_layers: int = 6
    text_lambda: float = 0.1
    image_lambda: float = 0.1
    taps: tuple[int, ...] = (6, 12, 18, 24)
    vv_start: int = 6
    disentangle_weight: float = 0.1
    logit_scale: float = 100.0
    projector_act: bool = False
    patch_aggregation: str = "maps"
    stage1_all_taps: bool = False
    stage1_image_loss: bool = False
    adapt_text: bool = True
    class_descriptions: bool = True
    domain: str = "industrial"
    blur_kernel: int | None = None
    blur_sigma: float | None = None
    quick_gelu: bool | None = False
    official_compat: bool = False


@dataclass(frozen=True)
class AACLIPSchedule:
    """Training-stage defaults (official `train.py:198-203,263-274`): text 5 epochs, batch 16, lr 1e-5;
    image 20 epochs, batch 2, lr 5e-4, MultiStepLR 16k/32k per iteration; Adam(0.5, 0.999), augmented."""

    text: TrainConfig = TrainConfig(epochs=5, batch_size=16, lr=1e-5, betas=(0.5, 0.999), augment=True)
    image: TrainConfig = TrainConfig(
        epochs=20,
        batch_size=2,
        lr=5e-4,
        betas=(0.5, 0.999),
        schedule="multistep",
        milestones=(16000, 32000),
        gamma=0.5,
        augment=True,
    )


@dataclass
class VisualBranch:
    """Stage-2 / test visual outputs: per-tap (or aggregated) unit-norm patch features and ``det``.

    Attributes:
        patches: list of (B, N, E) unit-norm patch features, one per map.
        det: (B, E) mean of the unit-norm ``det_proj`` patch features (not re-normalised).
    """

    patches: list[torch.Tensor]
    det: torch.Tensor


# ---------------------------------------------------------------------------------------------- math
def segmentation_probabilities(logits: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Training map of Eq. (3)-(4): logits on the patch grid, bilinear (align_corners=True) to S, softmax.

    Args:
        logits: (B, N, 2) patch logits, N = gh·gw row-major.
        grid: (gh, gw).
        size: S.

    Returns:
        (B, 2, S, S) probabilities [p_n, p_a].
    """
    b = logits.shape[0]
    maps = logits.transpose(1, 2).reshape(b, 2, *grid)  # (B, 2, gh, gw)
    maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=True)  # (B, 2, S, S)
    return maps.softmax(dim=1)


def alignment_segmentation_loss(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """L_seg of Eq. (4) as the official code computes it: focal(P, S) + dice(p_n, 1 − S) + dice(p_a, S).

    Args:
        probs: (B, 2, S, S) from `segmentation_probabilities`.
        masks: (B, S, S) 0/1.
    """
    return focal_loss(probs, masks) + dice_loss(probs[:, 0], 1.0 - masks) + dice_loss(probs[:, 1], masks)


def disentangle_loss(anchors: torch.Tensor) -> torch.Tensor:
    """Eq. (5) as the official code computes it: the square of the batch mean of ⟨T_N, T_A⟩.

    Args:
        anchors: (B, 2, E) [T_N, T_A] of each training image's class.
    """
    return (anchors[:, 0] * anchors[:, 1]).sum(dim=-1).mean() ** 2


def total_loss(align: torch.Tensor, disentangle: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. (6): L_total = L_align + γ·L_dis."""
    return align + gamma * disentangle


def reference_patch_features(projected: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Stage-1 visual reference (official): normalise(ln_post(tok)·proj) + normalise(CLS), not re-normalised.

    Args:
        projected: (B, N, E) V-V-pass patch tokens after ``ln_post`` and ``proj``.
        cls: (B, E) CLS embedding of the unmodified CLIP (any norm).
    """
    return F.normalize(projected, dim=-1) + F.normalize(cls, dim=-1)[:, None]


def aggregate_patch_features(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. (7) of the paper: V_patch = Σ_i V_patch^i, re-normalised for the cosine of Eq. (3).

    Args:
        features: per tap (B, N, E) unit-norm projected features.
    """
    return F.normalize(torch.stack(list(features)).sum(dim=0), dim=-1)


def tap_anomaly_map(logits: torch.Tensor) -> torch.Tensor:
    """Official test-time map of one tap: (l_a + 1 − l_n) / 2 on the logits (no softmax).

    Args:
        logits: (B, N, 2) = 100·cos against [T_N, T_A].

    Returns:
        (B, N).
    """
    return (logits[..., 1] + 1.0 - logits[..., 0]) / 2.0


def image_term(det: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Official test-time image branch score (det·T_A + 1) / 2.

    Args:
        det: (B, E) ``det`` embeddings; anchors: (B, 2, E).
    """
    return ((det * anchors[:, 1]).sum(dim=-1) + 1.0) / 2.0


def per_image_score(
    pixel_max: torch.Tensor, n_maps: int, det_logits: torch.Tensor, medical: bool
) -> torch.Tensor:
    """Per-image (streaming) score: 0.5·sigmoid(m̄_max) + 0.5·softmax(det logits)_a (medical: first term).

    m̄ is the tap-mean of the logit difference 100·(cos_a − cos_n): a summed test map M of ``n_maps``
    taps gives m̄ = (2·M − n_maps) / n_maps (each tap contributes (d + 1)/2).

    Args:
        pixel_max: (B,) maximum of the summed, blurred map.
        n_maps: number of tap maps summed into it.
        det_logits: (B, 2) [det·T_N, det·T_A] (the stage-2 CE logits, no scale).
        medical: pixel term only.
    """
    pixel = torch.sigmoid((2.0 * pixel_max - n_maps) / n_maps)  # (B,)
    if medical:
        return pixel
    return 0.5 * pixel + 0.5 * det_logits.softmax(dim=-1)[:, 1]


def _min_max(values: np.ndarray, low: float, high: float, skip_if_max_one: bool) -> np.ndarray:
    """(v − low) / (high − low); constant sets map to 0. ``skip_if_max_one``: the official
    ``if max != 1`` guard (values returned unchanged when the maximum is exactly 1)."""
    if skip_if_max_one and high == 1.0:
        return values
    if high == low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def set_level_scores(
    maps: Sequence[np.ndarray], image_terms: np.ndarray, medical: bool, official_compat: bool = False
) -> np.ndarray:
    """Table scores of one class (official ``metrics_eval``): pixel min-max over all pixels of the class,
    per-image max, image terms min-max over the class, 0.5·pixel + 0.5·image (medical: pixel only).

    Args:
        maps: (H_i, W_i) anomaly maps of the class's images.
        image_terms: (N,) (det·T_A + 1)/2 per image.
        medical: pixel part only.
        official_compat: keep the official ``if max != 1`` guards.

    Returns:
        (N,) float64 scores.
    """
    low = min(float(m.min()) for m in maps)
    high = max(float(m.max()) for m in maps)
    pixel_max = np.array([float(m.max()) for m in maps], dtype=np.float64)
    pixel = _min_max(pixel_max, low, high, official_compat)
    if medical:
        return pixel
    terms = np.asarray(image_terms, dtype=np.float64)
    image = _min_max(terms, float(terms.min()), float(terms.max()), official_compat)
    return 0.5 * pixel + 0.5 * image


# ------------------------------------------------------------------------------------- augmentation
def geometric_augmentation() -> T.Compose:
    """Official joint image+mask augmentation (applied after normalisation, nearest, fill 0)."""
    return T.Compose(
        [
            T.RandomApply([T.RandomRotation(degrees=ROTATION_DEGREES)], p=GEOMETRIC_P),
            T.RandomApply([T.RandomAffine(degrees=0, translate=(TRANSLATE, TRANSLATE))], p=GEOMETRIC_P),
            T.RandomHorizontalFlip(p=GEOMETRIC_P),
            T.RandomVerticalFlip(p=GEOMETRIC_P),
        ]
    )


def colour_augmentation() -> T.Compose:
    """Official stage-2 colour jitter on the PIL image before resizing (brightness, contrast, saturation)."""
    return T.Compose(
        [
            T.RandomApply([T.ColorJitter(brightness=JITTER_STRENGTH)], p=JITTER_P),
            T.RandomApply([T.ColorJitter(contrast=JITTER_STRENGTH)], p=JITTER_P),
            T.RandomApply([T.ColorJitter(saturation=JITTER_STRENGTH)], p=JITTER_P),
        ]
    )


# ------------------------------------------------------------------------------------------ modules
class NormMatchedResidualAdapter(nn.Module):
    """AA-CLIP residual adapter, Eq. (1)-(2) of AA-CLIP (002 §3.2.1), as the official code reads them.

        a = LeakyReLU(W x)              W: (D, D), no bias, xavier-uniform init; slope 0.01
        a <- a * ||x|| / ||a||          per token: "Norm" matches the adapter output to the token's norm
        x <- lam * a + (1 - lam) * x    lam = 0.1

    Applied to every token, after the MLP of each of the first K blocks. ``||a||`` is clamped at 1e-12
    (the official code divides unguarded; the clamp only acts on an all-zero adapter output).
    """

    def __init__(self, dim: int, lam: float = 0.1):
        super().__init__()
        self.lam = lam
        self.fc = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.leaky_relu(self.fc(x))  # (..., D)
        a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.lam * a + (1.0 - self.lam) * x


class BiasFreeProjection(nn.Module):
    """Linear map without bias, optionally followed by LeakyReLU (slope 0.01); xavier-uniform init.

    AA-CLIP's learnable text projection (768->768 with LeakyReLU, replacing CLIP's ``text_projection``)
    and its image projectors ``seg_proj`` / ``det_proj`` (1024->768, no activation by default).
    """

    def __init__(self, in_dim: int, out_dim: int, act: bool):
        super().__init__()
        self.act = act
        self.fc = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return F.leaky_relu(y) if self.act else y


# ------------------------------------------------------------------------------------------- method
@register("aa-clip")
class AACLIP(Method):
    """AA-CLIP: two-stage residual-adapter adaptation of a frozen CLIP (module docstring)."""

    config_class = AACLIPConfig
    schedule_class = AACLIPSchedule
    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    resize = "squash"
    pos_interp = "bicubic"
    shot_semantics = "per_class"  # paper §4.1: "2-shot" = one normal + one anomalous image per class

    def __init__(self, config: AACLIPConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        _check_config(config, backbone)
        bb = backbone
        self.text_layers = list(
            range(1, map_layer(config.text_adapter_layers, bb.text_depth, TEXT_REF_DEPTH) + 1)
        )
        self.image_layers = list(
            range(1, map_layer(config.image_adapter_layers, bb.depth, VISUAL_REF_DEPTH) + 1)
        )
        self.taps = map_layers(config.taps, bb.depth, VISUAL_REF_DEPTH)
        self.vv_layers = list(range(map_layer(config.vv_start, bb.depth, VISUAL_REF_DEPTH), bb.depth + 1))
        self.blur = (
            config.blur_kernel if config.blur_kernel is not None else BLUR[config.domain][0],
            config.blur_sigma if config.blur_sigma is not None else BLUR[config.domain][1],
        )
        if config.adapt_text:
            self.text_adapters = nn.ModuleList(
                NormMatchedResidualAdapter(bb.text_width, config.text_lambda) for _ in self.text_layers
            )
            self.text_projection = BiasFreeProjection(bb.text_width, bb.embed_dim, act=True)
        self.image_adapters = nn.ModuleList(
            NormMatchedResidualAdapter(bb.width, config.image_lambda) for _ in self.image_layers
        )
        self.seg_projectors = nn.ModuleList(
            BiasFreeProjection(bb.width, bb.embed_dim, act=config.projector_act) for _ in self.taps
        )
        self.det_projector = BiasFreeProjection(bb.width, bb.embed_dim, act=config.projector_act)

    # ------------------------------------------------------------------ construction
    @classmethod
    def image_size(cls, config: AACLIPConfig, backbone: str) -> int | None:
        if config.image_size is not None:
            return config.image_size
        return PAPER_IMAGE_SIZE if backbone.startswith("ViT-L-14") else None

    @classmethod
    def backbone_options(cls, config: AACLIPConfig) -> dict[str, Any]:
        """The backbone gets the configured activation (official AA-CLIP runs exact GELU)."""
        return {"quick_gelu": config.quick_gelu}

    # ------------------------------------------------------------------ text
    def _text_parameters(self) -> list[nn.Parameter]:
        if not self.config.adapt_text:
            return []
        return [*self.text_adapters.parameters(), *self.text_projection.parameters()]

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P, E) unit-norm embeddings of prompts through the adapted (or original) text tower."""
        tokens = self.backbone.tokenize(prompts)  # (P, 77)
        if not self.config.adapt_text:
            return self.backbone.encode_text(tokens)
        adapters = dict(zip(self.text_layers, self.text_adapters, strict=True))
        return self.backbone.encode_text(tokens, adapters=adapters, projection=self.text_projection)

    def prompts(self, class_name: str) -> tuple[list[str], list[str]]:
        """Supplement Table 5 prompts of a class (normal, anomalous)."""
        if self.config.class_descriptions:
            return aa_clip_prompts(class_name)
        return AA_CLIP.build(class_word(class_name))

    def class_anchors(self, class_names: Sequence[str]) -> torch.Tensor:
        """[T_N, T_A] per class (re-normalised prompt-ensemble means), with gradients: (C, 2, E)."""
        prompt_sets = [self.prompts(c) for c in class_names]
        flat = [p for normal, anomalous in prompt_sets for p in (*normal, *anomalous)]
        embeddings = self.encode_prompts(flat)  # (C·P, E)
        anchors, start = [], 0
        for normal, anomalous in prompt_sets:
            pair = []
            for group in (normal, anomalous):
                block = embeddings[start : start + len(group)]  # (P_side, E)
                pair.append(ensemble_text_features(lambda _, b=block: b, group))
                start += len(group)
            anchors.append(torch.stack(pair))  # (2, E)
        return torch.stack(anchors)  # (C, 2, E)

    @torch.no_grad()
    def frozen_anchors(self, class_names: Sequence[str]) -> torch.Tensor:
        """[T_N, T_A] of each name (B, 2, E), cached per class while the text parameters are unchanged."""
        return self.cached_anchors(class_names, self.class_anchors, self._text_parameters())  # (B, 2, E)

    # ------------------------------------------------------------------ image
    def visual_branch(self, images: torch.Tensor) -> VisualBranch:
        """Adapted image tower: per-tap unit-norm ``seg_proj`` features (or their Eq. 7 sum) and ``det``."""
        adapters = dict(zip(self.image_layers, self.image_adapters, strict=True))
        out = self.backbone.encode_image(images, layers=self.taps, adapters=adapters)
        normed = [self.backbone.post_norm(out.tokens[i][:, 1:]) for i in self.taps]  # each (B, N, D)
        patches = [
            F.normalize(proj(t), dim=-1) for proj, t in zip(self.seg_projectors, normed, strict=True)
        ]  # each (B, N, E)
        det = F.normalize(self.det_projector(normed[-1]), dim=-1).mean(dim=1)  # (B, E)
        if self.config.patch_aggregation == "features":
            patches = [aggregate_patch_features(patches)]
        return VisualBranch(patches, det)

    @torch.no_grad()
    def reference_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Stage-1 frozen visual reference: per tap (B, N, E) V-V-pass features + normalised CLS."""
        kind = "vv-batch" if self.config.official_compat else "vv"  # official: mixes the batch's images
        vv = self.backbone.encode_image(
            images, layers=self.taps, attention=dict.fromkeys(self.vv_layers, kind)
        )
        cls = self.backbone.encode_image(images, cls_only=True).cls  # (B, E), unmodified CLIP
        return [reference_patch_features(self.backbone.project(vv.tokens[i][:, 1:]), cls) for i in self.taps]

    # ------------------------------------------------------------------ inference
    def anomaly_maps(self, patches: Sequence[torch.Tensor], anchors: torch.Tensor) -> torch.Tensor:
        """Test maps: Σ_taps (l_a + 1 − l_n)/2, blurred on the patch grid, bilinear to S: (B, S, S).

        Blur and upsampling are linear, so summing the taps first equals the official per-tap order.
        """
        b = anchors.shape[0]
        total = sum(tap_anomaly_map(anchor_logits(f, anchors, self.config.logit_scale)) for f in patches)
        grid = total.reshape(b, *self.backbone.grid)  # (B, gh, gw)
        kernel, sigma = self.blur
        blurred = gaussian_blur(grid, sigma, radius=kernel // 2, border="mirror")  # kornia's (B, gh, gw)
        size = (self.backbone.image_size, self.backbone.image_size)
        return F.interpolate(blurred[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]

    def forward_batch(self, images: torch.Tensor, class_names: list[str], support: Any) -> BatchPrediction:
        """Per-image scores (B,), maps (B, S, S) and the image-branch term `set_scores` needs."""
        anchors = self.frozen_anchors(class_names)  # (B, 2, E)
        branch = self.visual_branch(images)
        maps = self.anomaly_maps(branch.patches, anchors)  # (B, S, S)
        det_logits = anchor_logits(branch.det[:, None], anchors, 1.0)[:, 0]  # (B, 2)
        medical = self.config.domain == "medical"
        scores = per_image_score(maps.flatten(1).amax(dim=1), len(branch.patches), det_logits, medical)
        return BatchPrediction(scores, maps, {"image_term": image_term(branch.det, anchors)})  # term (B,)

    def set_scores(self, prediction: Prediction, class_names: Sequence[str]) -> np.ndarray:
        """Official table scores, per class over the evaluated set (`set_level_scores`), from the
        maps and the image-branch terms of ``prediction`` (as returned by `predict`)."""
        if "image_term" not in prediction.extras:
            raise ValueError("aa-clip set_scores needs a Prediction made by aa-clip's predict (image_term)")
        terms = prediction.extras["image_term"]
        maps = list(prediction.maps)
        names = list(class_names)
        out = np.zeros(len(names), dtype=np.float64)
        for cls in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == cls]
            out[idx] = set_level_scores(
                [maps[i] for i in idx],
                terms[idx],
                medical=self.config.domain == "medical",
                official_compat=self.config.official_compat,
            )
        return out

    # ------------------------------------------------------------------ training
    def training_stages(self) -> list[Stage]:
        stages = []
        if self.config.adapt_text:
            stages.append(
                Stage(
                    name="text",
                    parameters=self._text_parameters,
                    loss=self.text_stage_loss,
                    config=self.schedule.text,
                    collate=functools.partial(self.collate_augmented, colour=False),
                )
            )
        stages.append(
            Stage(
                name="image",
                parameters=lambda: [
                    *self.image_adapters.parameters(),
                    *self.seg_projectors.parameters(),
                    *self.det_projector.parameters(),
                ],
                loss=self.image_stage_loss,
                config=self.schedule.image,
                collate=functools.partial(self.collate_augmented, colour=True),
            )
        )
        return stages

    def collate_augmented(self, samples: list[Sample], augment: bool, colour: bool) -> TrainBatch:
        """Official training pipeline: colour jitter (stage 2) before resizing, then the joint geometric
        augmentation of normalised image and mask."""
        if augment and colour:
            jitter = colour_augmentation()
            samples = [
                dataclasses.replace(s, image=np.asarray(jitter(Image.fromarray(s.image)))) for s in samples
            ]
        batch = self.collate(samples, augment)
        if not augment:
            return batch
        geometric = geometric_augmentation()
        images, masks = [], []
        for image, mask in zip(batch.images, batch.masks, strict=True):
            out = geometric(torch.cat([image, mask[None]]))  # (4, S, S)
            images.append(out[:3])
            masks.append(out[3])
        return dataclasses.replace(batch, images=torch.stack(images), masks=torch.stack(masks))

    def _segmentation_loss(self, patches: Sequence[torch.Tensor], anchors: torch.Tensor, batch: TrainBatch):
        """Σ over maps of L_seg on the images with pixel supervision (0 when none has)."""
        keep = batch.has_mask
        if not bool(keep.any()):
            return anchors.new_zeros(())
        size = self.backbone.image_size
        loss = anchors.new_zeros(())
        for f in patches:
            logits = anchor_logits(f[keep], anchors[keep], self.config.logit_scale)  # (B', N, 2)
            probs = segmentation_probabilities(logits, self.backbone.grid, size)  # (B', 2, S, S)
            loss = loss + alignment_segmentation_loss(probs, batch.masks[keep])
        return loss

    def text_stage_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Stage 1 (Eq. 3-6): align the adapted text anchors with the frozen V-V reference features."""
        batch = batch.to(self.device)
        names = list(dict.fromkeys(batch.class_names))
        per_class = self.class_anchors(names)  # (C, 2, E)
        anchors = per_class[[names.index(c) for c in batch.class_names]]  # (B, 2, E)
        reference = self.reference_features(batch.images)
        taps = reference if self.config.stage1_all_taps else reference[-1:]
        seg = self._segmentation_loss(taps, anchors, batch)
        dis = disentangle_loss(anchors)
        align = seg
        terms = {"seg": seg.detach(), "disentangle": dis.detach()}
        if self.config.stage1_image_loss:
            with torch.no_grad():
                cls = F.normalize(self.backbone.encode_image(batch.images).cls, dim=-1)  # (B, E)
            logits = anchor_logits(cls[:, None], anchors, self.config.logit_scale)[:, 0]  # (B, 2)
            image_loss = F.cross_entropy(logits, batch.labels)
            align = align + image_loss
            terms["image"] = image_loss.detach()
        return {"loss": total_loss(align, dis, self.config.disentangle_weight), **terms}

    def image_stage_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Stage 2: align the adapted patch features (per tap) and ``det`` with the frozen anchors."""
        batch = batch.to(self.device)
        anchors = self.frozen_anchors(batch.class_names)  # (B, 2, E)
        branch = self.visual_branch(batch.images)
        seg = self._segmentation_loss(branch.patches, anchors, batch)
        det_logits = anchor_logits(branch.det[:, None], anchors, 1.0)[:, 0]  # (B, 2)
        image_loss = F.cross_entropy(det_logits, batch.labels)
        return {"loss": seg + image_loss, "seg": seg.detach(), "image": image_loss.detach()}


# ---------------------------------------------------------------------------------------------- helpers
def _check_config(config: AACLIPConfig, backbone: ClipBackbone) -> None:
    if config.domain not in DOMAINS:
        raise ValueError(f"aa-clip: domain must be one of {', '.join(DOMAINS)}, got {config.domain!r}")
    if config.patch_aggregation not in AGGREGATIONS:
        raise ValueError(
            f"aa-clip: patch_aggregation must be one of {', '.join(AGGREGATIONS)}, "
            f"got {config.patch_aggregation!r}"
        )
    if config.text_adapter_layers < 1 or config.image_adapter_layers < 1 or not config.taps:
        raise ValueError("aa-clip: text_adapter_layers and image_adapter_layers must be ≥ 1, taps non-empty")
    kernel = config.blur_kernel if config.blur_kernel is not None else BLUR[config.domain][0]
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"aa-clip: blur_kernel must be odd and positive, got {kernel}")
    if min(backbone.grid) <= kernel // 2:
        need = (kernel // 2 + 1) * backbone.patch_size
        raise ValueError(
            f"aa-clip: the {kernel}x{kernel} blur needs a patch grid of at least {kernel // 2 + 1}; "
            f"use image_size >= {need} (got {backbone.image_size})"
        )
