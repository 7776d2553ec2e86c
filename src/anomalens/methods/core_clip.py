"""CoRe-CLIP ("Conditional Compatibility for Anomaly Detection", paper 000): contextual anomaly detection.

A contextual anomaly is a normal-looking subject in a context it does not belong to; the label belongs to
the subject-context pair. CoRe-CLIP reads an image through three branches of one frozen CLIP ViT and lets
the anomalous text decide how much each branch counts. Equations of paper 000, App. A-B, as DESIGN §4
reads them (every choice the paper leaves open is listed in ``docs/methods/core-clip.md``):

* CSR (A.2, Eq. 10-12): training views x_s = m⊙x, x_c = (1 − m)⊙x, x_g = x (m = subject mask); each
  branch b has its own residual module CSR_b^(i) (bias-free bottleneck MLP D → D/4 → D) in the first
  K = 6 (of 24) blocks, ``X ← (1 − λ_i)·X + λ_i·CSR_b^(i)(X)`` with λ_i = sigmoid(learnable), one per
  layer (Eq. 11 indexes λ by layer only). All branches run in **one** batched forward: the views are
  stacked along the batch, the per-layer adapter splits the stack by branch. z̃_b = CLS and P̃_b = patch
  tokens of the last block, through ``ln_post`` and ``proj`` (the joint space), L2-normalised. At
  inference every branch sees the unmasked image.
* Text refinement (A.3-A.4, Eq. 13-17): gated residual two-layer MLPs after the first L = 3 (of 12)
  text blocks, ``Z ← (1 − γ_i)·Z + γ_i·TR^(i)(Z)``; t̃0, t̃1 = re-normalised means of the normalised
  embeddings of the B.3 prompt sets. L_text = λ_o·w(t)·⟨t̃0,t̃1⟩² + λ_c·½Σ_k‖t̃k − t̃μ‖² +
  λ_g·(1 − cos(v_cls, t̃μ)) [+ λ_cal·L_calib (Eq. 33)], w(t) a linear warm-up of the orthogonality
  weight over the first 40 % of the text stage's optimiser steps ("annealed", A.4; "30–50 %", B.4),
  v_cls the CLS embedding of the unadapted CLIP.
* CRM (A.5, Eq. 18-22): q = W_q t̃1, keys W_k z̃_b, α = softmax(qᵀK/√D_a), z̃_crm = Σ_b α_b z̃_b.
* Losses (A.6-A.8, Eq. 23-28): CE over s·[cos(z̃_b, t̃0), cos(z̃_b, t̃1)] per branch (s = CLIP's logit
  scale), fused CE, fuse-cons ‖S_crm − mean_b S_b‖² on the cosines S = [cos0, cos1] (option: on the
  s-scaled logits, 10⁴ × larger), fuse-ent −H(α); weights of Table 7.
* Scoring (A.9, Eq. 30-32): s(x) = σ(cos(z̃_crm, t̃1) − cos(z̃_crm, t̃0)); map = Σ_b α_b·(cos(p̃_b, t̃1) −
  cos(p̃_b, t̃0)) on the patch grid, bilinear to the input size.
* Training (B.1-B.2, Table 7): stage "text" (text refinement, 5 epochs, batch 16, lr 2e-5), stage
  "image" (CSR + CRM, 20 epochs, batch 8, lr 3e-4; B.1's conflicting 5e-5 with a cosine schedule
  via ``image.lr`` / ``image.schedule``), Adam
  (0.5, 0.999), MultiStepLR (16k, 32k iterations, γ = 0.5).

Single-branch mode (``branches=("g",)``) is the paper's configuration for MVTec AD / VisA (B.1, C.4
"CoRe-CLIP-A"): only the global branch exists and the CRM reduces to α = 1. In three-branch mode a
training image without a subject mask trains only the global branch (its fused terms are skipped).
No official code has been released, so there is no ``official_compat`` switch and no converter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import ClipBackbone, map_layer
from anomalens.data.types import Dataset, Sample
from anomalens.losses import full_precision
from anomalens.methods.base import (
    BatchPrediction,
    Method,
    Stage,
    TrainBatch,
    TrainConfig,
    TrainProgress,
    register,
)
from anomalens.ops import anchor_logits, anchor_probability
from anomalens.prompts import CORE_CLIP_CONTEXT, CORE_CLIP_DEFECT, core_clip_prompts

# Reference depths of the paper's layer indices (ViT-L/14: 24 visual, 12 text blocks).
VISUAL_REF_DEPTH = 24
TEXT_REF_DEPTH = 12
BRANCHES = ("s", "c", "g")  # subject, context, global: the canonical stacking order
FUSIONS = ("crm", "mean")
PROMPT_SETS = {"context": CORE_CLIP_CONTEXT, "defect": CORE_CLIP_DEFECT}
MASK_FILLS = ("zero", "black")
GROUND_SOURCES = ("global", "clip")
FUSE_CONS_SPACES = ("cosine", "logits")


@dataclass(frozen=True)
class CoReCLIPConfig:
    """Options of `CoReCLIP` (serialised verbatim into checkpoints and results).

    Layer counts are written for the paper's ViT-L/14 (24 visual, 12 text blocks) and mapped to the
    backbone's depth with `map_layer` (``round(i·d/24)``, at least 1).

    Attributes:
        image_size: input side S; None = the backbone's native size (336 for ViT-L-14-336).
        branches: active branches, a subset of ("s", "c", "g") (subject, context, global); ("g",) is the
            single-branch mode of MVTec AD / VisA (paper B.1); two-branch sets are Table 10's ablations.
        fusion: "crm" (Eq. 19-22) or "mean" (Table 11's average fusion, α = 1/n_branches).
        csr_layers: K, CSR adapters after visual blocks 1..K (of 24).
        text_layers: L, gated text MLPs after text blocks 1..L (of 12).
        reduction: hidden width D/reduction of the CSR and TR MLPs (1 = a D → D → D MLP).
        gate_init: initial λ_i (Eq. 11) and γ_i (Eq. 13), both sigmoid(learnable).
        attention_dim: D_a of the CRM (Eq. 19-21).
        prompt_set: "context" (App. B.3 sentences) or "defect" (WinCLIP states with B.3 templates, for
            structural-defect datasets).
        logit_scale: scale of the CE logits (Eq. 23-25); None = the backbone's CLIP logit scale.
        mask_fill: masked pixels of the training views (Eq. 10): "zero" in the normalised tensor (the
            dataset mean colour, "consistent with CLIP preprocessing") or "black" pixels.
        ground_source: v_cls of L_ground / L_calib: "clip" (the unadapted CLIP CLS embedding) or
            "global" (the global branch, no gradient; its CSR adapters are still random in stage 1).
        ortho_weight, cons_weight, ground_weight, calib_weight: λ_ortho, λ_cons, λ_ground, λ_calib
            (Table 7; λ_calib > 0 only for MVTec AD / VisA).
        ortho_warmup: λ_ortho ramps linearly from 0 over this share of the text stage's optimiser
            steps (B.4: 30–50 %); 0 = no warm-up.
        calib_margin: m of Eq. (33) (the paper gives no value).
        branch_weight, fuse_img_weight, fuse_cons_weight, fuse_ent_weight: weights of Eq. (28).
        fuse_cons_space: what Eq. (25) compares: "cosine" ([cos0, cos1], the paper's S) or "logits"
            (the CE logits s·[cos0, cos1], 10⁴ × larger with s = 100).
    """

    image_size: int | None = None
    branches: tuple[str, ...] = BRANCHES
    fusion: str = "crm"
    csr_layers: int = 6
    text_layers: int = 3
    reduction: int = 4
    gate_init: float = 0.1
    attention_dim: int = 256
    prompt_set: str = "context"
    logit_scale: float | None = None
    mask_fill: str = "zero"
    ground_source: str = "clip"
    ortho_weight: float = 0.10
    cons_weight: float = 0.10
    ground_weight: float = 0.05
    calib_weight: float = 0.0
    ortho_warmup: float = 0.4
    calib_margin: float = 0.2
    branch_weight: float = 1.0
    fuse_img_weight: float = 1.0
    fuse_cons_weight: float = 0.5
    fuse_ent_weight: float = 0.05
    fuse_cons_space: str = "cosine"


@dataclass(frozen=True)
class CoReCLIPSchedule:
    """Training-stage defaults (Table 7): text 5 epochs, batch 16, lr 2e-5; image 20 epochs, batch 8,
    lr 3e-4, MultiStepLR 16k/32k optimiser steps, γ 0.5; Adam(0.5, 0.999). B.1's reading of the image
    stage: ``image.lr=5e-5``, ``image.schedule=cosine``."""

    text: TrainConfig = TrainConfig(epochs=5, batch_size=16, lr=2e-5, betas=(0.5, 0.999))
    image: TrainConfig = TrainConfig(
        epochs=20,
        batch_size=8,
        lr=3e-4,
        betas=(0.5, 0.999),
        schedule="multistep",
        milestones=(16000, 32000),
        gamma=0.5,
    )


@dataclass
class BranchFeatures:
    """Outputs of the branches for a batch of B images, branches in `CoReCLIP.branches` order.

    Attributes:
        cls: (B, n_branches, E) z̃_b, unit norm (Eq. 12).
        patches: (B, n_branches, N, E) P̃_b, unit norm (Eq. 12).
    """

    cls: torch.Tensor
    patches: torch.Tensor


@dataclass
class ContextBatch(TrainBatch):
    """A `TrainBatch` that also says which images came with a subject mask."""

    has_subject: torch.Tensor | None = None  # (B,) bool

    def to(self, device: torch.device | str) -> ContextBatch:
        moved = super().to(device)
        has_subject = None if self.has_subject is None else self.has_subject.to(device)
        return dataclasses.replace(moved, has_subject=has_subject)


# ---------------------------------------------------------------------------------------------- math
def masked_views(images: torch.Tensor, subject: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Eq. (10): x_s = m⊙x and x_c = (1 − m)⊙x, masked pixels set to ``fill``.

    Args:
        images: (B, 3, S, S) normalised images.
        subject: (B, S, S) subject mask m in {0, 1}.
        fill: (1, 3, 1, 1) or scalar value of a masked pixel (0 = zero in the normalised tensor).

    Returns:
        (2, B, 3, S, S): [x_s, x_c].
    """
    m = subject[:, None].to(images.dtype)  # (B, 1, S, S)
    x_s = m * images + (1.0 - m) * fill  # (B, 3, S, S)
    x_c = (1.0 - m) * images + m * fill  # (B, 3, S, S)
    return torch.stack([x_s, x_c])


def csr_update(x: torch.Tensor, residual: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Eq. (11): X ← (1 − λ_i)·X + λ_i·CSR_b^(i)(X).

    Args:
        x: (..., D) tokens; residual: CSR_b^(i)(x), same shape; lam: scalar λ_i in [0, 1].
    """
    return (1.0 - lam) * x + lam * residual


def prompt_anchor_pair(normal: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
    """t̃0, t̃1 of App. B.3: re-normalised means of the normalised prompt embeddings
    (`prompts.ensemble_text_features` of each side).

    Args:
        normal: (P0, E) and anomalous: (P1, E) embeddings of one class's prompts.

    Returns:
        (2, E) [t̃0, t̃1], unit norm.
    """
    return torch.stack([F.normalize(F.normalize(e, dim=-1).mean(dim=0), dim=-1) for e in (normal, anomalous)])


def orthogonality_loss(text: torch.Tensor) -> torch.Tensor:
    """Eq. (14): L_ortho = ⟨t̃0, t̃1⟩², averaged over classes.

    Args:
        text: (C, 2, E) [t̃0, t̃1] per class, unit norm.
    """
    return ((text[:, 0] * text[:, 1]).sum(dim=-1) ** 2).mean()


def consistency_loss(text: torch.Tensor) -> torch.Tensor:
    """Eq. (15): L_cons = ½(‖t̃0 − t̃μ‖² + ‖t̃1 − t̃μ‖²), t̃μ = (t̃0 + t̃1)/2, averaged over classes.

    Args:
        text: (C, 2, E).
    """
    mu = text.mean(dim=1, keepdim=True)  # (C, 1, E)
    return (0.5 * (text - mu).square().sum(dim=(1, 2))).mean()


def grounding_loss(v_cls: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. (16): L_ground = 1 − cos(v_cls, t̃μ), averaged over images.

    Args:
        v_cls: (B, E) visual class tokens (any norm); text: (B, 2, E) each image's class pair.
    """
    return (1.0 - F.cosine_similarity(v_cls, text.mean(dim=1), dim=-1)).mean()


def calibration_loss(
    v_cls: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, margin: float
) -> torch.Tensor:
    """Eq. (33): [m − ⟨v, t1⟩ + ⟨v, t0⟩]_+ for anomalous images, mirrored for normal ones.

    The paper writes the anomalous case only; applied to every image as written it would pull normal
    images towards t1 too, so normal images get [m − ⟨v, t0⟩ + ⟨v, t1⟩]_+ (our reading). v is L2-normalised.

    Args:
        v_cls: (B, E); text: (B, 2, E) unit norm; labels: (B,) 0/1.
    """
    cos = torch.einsum("be,bke->bk", F.normalize(v_cls, dim=-1), text)  # (B, 2)
    sign = 2.0 * labels.to(cos.dtype) - 1.0  # +1 anomalous, -1 normal
    return F.relu(margin - sign * (cos[:, 1] - cos[:, 0])).mean()


def text_objective(
    ortho: torch.Tensor,
    cons: torch.Tensor,
    ground: torch.Tensor,
    weights: tuple[float, float, float],
    calib: torch.Tensor | None = None,
    calib_weight: float = 0.0,
) -> torch.Tensor:
    """Eq. (17) (+ B.3's optional λ_calib·L_calib): λ_o·L_ortho + λ_c·L_cons + λ_g·L_ground."""
    total = weights[0] * ortho + weights[1] * cons + weights[2] * ground
    return total if calib is None else total + calib_weight * calib


@full_precision
def compatibility(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. (18) / (31): cos(feature, t̃k) for k in {0, 1}.

    Args:
        features: (B, ..., E) unit-norm embeddings (branch CLS (B, n, E) or patches (B, n, N, E)).
        text: (B, 2, E) unit-norm [t̃0, t̃1] of each image's class.

    Returns:
        (B, ..., 2).
    """
    return anchor_logits(features, text, 1.0)


@full_precision
def crm_weights(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Eq. (21): α = softmax(qᵀK / √D_a) over the branches.

    Args:
        query: (B, D_a) q = W_q t̃1 (Eq. 19); keys: (B, n, D_a) W_k z̃_b (Eq. 20).

    Returns:
        (B, n).
    """
    scores = torch.einsum("ba,bna->bn", query, keys) / math.sqrt(query.shape[-1])  # (B, n)
    return scores.softmax(dim=-1)


def crm_fuse(alpha: torch.Tensor, branch_cls: torch.Tensor) -> torch.Tensor:
    """Eq. (22): z̃_crm = Σ_b α_b z̃_b.

    Args:
        alpha: (B, n); branch_cls: (B, n, E).

    Returns:
        (B, E), not re-normalised (the cosines of Eq. 24 and 30 normalise).
    """
    return torch.einsum("bn,bne->be", alpha, branch_cls)


@full_precision
def compatibility_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (23) / (24): softmax cross-entropy of the two-class logits s·[cos0, cos1] against y.

    Args:
        logits: (B, 2); labels: (B,) long.
    """
    return F.cross_entropy(logits, labels)


@full_precision
def fuse_consistency_loss(fused: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
    """Eq. (25): ‖S_crm − (1/n) Σ_b S_b‖²₂ (squared norm over the two entries), averaged over images.

    Args:
        fused: (B, 2) compatibilities [cos0, cos1] of z̃_crm (or its CE logits); branches: (B, n, 2)
            those of the branches, in the same space.
    """
    return (fused - branches.mean(dim=1)).square().sum(dim=-1).mean()


@full_precision
def negative_entropy(alpha: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Eq. (26): L_fuse-ent = −H(α) = Σ_b α_b log α_b, averaged over images.

    Args:
        alpha: (B, n) branch weights.
    """
    return (alpha * alpha.clamp_min(eps).log()).sum(dim=-1).mean()


def image_objective(
    branch_ce: torch.Tensor,
    fuse_ce: torch.Tensor,
    fuse_cons: torch.Tensor,
    fuse_ent: torch.Tensor,
    weights: tuple[float, float, float, float],
) -> torch.Tensor:
    """Eq. (28): w_b·Σ_b L_img^(b) + λ_fuse-img·L_fuse-img + λ_fuse-cons·L_fuse-cons + λ_fuse-ent·L_fuse-ent.

    Args:
        branch_ce: Σ_b L_img^(b) (already summed over branches); weights: (w_b, λ_fi, λ_fc, λ_fe).
    """
    return weights[0] * branch_ce + weights[1] * fuse_ce + weights[2] * fuse_cons + weights[3] * fuse_ent


def image_score(fused: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. (30): s(x) = σ(cos(z̃_crm, t̃1) − cos(z̃_crm, t̃0)) = softmax([cos0, cos1])_1.

    Args:
        fused: (B, E) z̃_crm (any norm); text: (B, 2, E) unit norm.
    """
    return anchor_probability(F.normalize(fused, dim=-1), text, 1.0)


def patch_margins(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. (31): m_{b,j} = cos(p̃_{b,j}, t̃1) − cos(p̃_{b,j}, t̃0).

    Args:
        patches: (B, n, N, E) unit norm; text: (B, 2, E).

    Returns:
        (B, n, N).
    """
    cos = compatibility(patches, text)  # (B, n, N, 2)
    return cos[..., 1] - cos[..., 0]


def fused_margins(alpha: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Eq. (32): m_j = Σ_b α_b m_{b,j}.

    Args:
        alpha: (B, n); margins: (B, n, N).

    Returns:
        (B, N).
    """
    return torch.einsum("bn,bnj->bj", alpha, margins)


def warmup_factor(done: float, warmup: float) -> float:
    """Linear warm-up of λ_ortho (A.4 "annealed"): min(1, done / warmup), both shares of the text
    stage's steps; 1 without warm-up."""
    if warmup <= 0:
        return 1.0
    return min(1.0, done / warmup)


# ---------------------------------------------------------------------------------------------- modules
class BottleneckMLP(nn.Module):
    """Bias-free bottleneck D -> D/reduction -> D with LeakyReLU in between, xavier-uniform init.

    Our reading of CoRe-CLIP's CSR_b (Eq. 11) and TR (Eq. 13), which the paper only calls a "residual
    module" / "two-layer MLP": bias-free and xavier-initialised like the AA-CLIP adapters it builds on,
    no activation on the output so the residual update can take either sign.
    """

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(f"BottleneckMLP: dim {dim} // reduction {reduction} leaves no hidden unit")
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.xavier_uniform_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.leaky_relu(self.down(x)))


class GatedResidual(nn.Module):
    """x <- (1 - g) * x + g * f(x) with a learnable gate g = sigmoid(theta) in (0, 1).

    CoRe-CLIP Eq. (11) (lambda_i, CSR adapters) and Eq. (13) (gamma_i, text refinement). The paper gives
    no initial value; ``init = 0.1`` starts from AA-CLIP's fixed lambda.
    """

    def __init__(self, module: nn.Module, init: float = 0.1):
        super().__init__()
        if not 0.0 < init < 1.0:
            raise ValueError(f"GatedResidual: init must be in (0, 1), got {init}")
        self.module = module
        self.theta = nn.Parameter(torch.tensor(math.log(init / (1.0 - init))))

    @property
    def gate(self) -> torch.Tensor:
        """The current gate value g = sigmoid(theta)."""
        return torch.sigmoid(self.theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate
        return (1.0 - g) * x + g * self.module(x)


class CSRLayer(nn.Module):
    """The CSR adapters of one visual block: one residual module per branch, one shared gate λ_i (Eq. 11).

    The input stacks the branches along the batch: (n·B, M, D) with branch k in rows k·B..(k+1)·B − 1.
    """

    def __init__(self, width: int, n_branches: int, reduction: int, gate_init: float):
        super().__init__()
        if not 0.0 < gate_init < 1.0:
            raise ValueError(f"core-clip: gate_init must be in (0, 1), got {gate_init}")
        self.modules_per_branch = nn.ModuleList(BottleneckMLP(width, reduction) for _ in range(n_branches))
        self.theta = nn.Parameter(torch.tensor(math.log(gate_init / (1.0 - gate_init))))

    @property
    def lam(self) -> torch.Tensor:
        """λ_i = sigmoid(θ_i) in (0, 1)."""
        return torch.sigmoid(self.theta)

    def forward(self, x: torch.Tensor, branch_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Apply the branches ``branch_ids`` (default: all, in order) to their slices of the stacked batch."""
        ids = range(len(self.modules_per_branch)) if branch_ids is None else branch_ids
        chunks = x.unflatten(0, (len(ids), -1)).unbind(0)  # each (B, M, D); no split guard in export
        out = [self.modules_per_branch[k](chunk) for k, chunk in zip(ids, chunks, strict=True)]
        return csr_update(x, torch.cat(out), self.lam)  # (n·B, M, D)


class CRM(nn.Module):
    """Compatibility Reasoning Module (Eq. 19-22): single-head attention of t̃1 over the branch embeddings."""

    def __init__(self, embed_dim: int, attention_dim: int):
        super().__init__()
        self.w_q = nn.Linear(embed_dim, attention_dim, bias=False)
        self.w_k = nn.Linear(embed_dim, attention_dim, bias=False)

    def forward(self, anomalous_text: torch.Tensor, branch_cls: torch.Tensor) -> torch.Tensor:
        """α (B, n) from t̃1 (B, E) and z̃_b (B, n, E)."""
        return crm_weights(self.w_q(anomalous_text), self.w_k(branch_cls))


# ------------------------------------------------------------------------------------------- method
@register("core-clip")
class CoReCLIP(Method):
    """CoRe-CLIP: tri-branch CSR adapters, refined text, text-conditioned fusion (module docstring)."""

    config_class = CoReCLIPConfig
    schedule_class = CoReCLIPSchedule
    default_backbone = "ViT-L-14-336"
    default_pretrained = "openai"
    resize = "squash"
    pos_interp = "bicubic"
    shot_semantics = "per_label"  # A.10: N normal + N anomalous images per class

    def __init__(self, config: CoReCLIPConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        _check_config(config)
        bb = backbone
        self.branches = tuple(b for b in BRANCHES if b in config.branches)
        n = len(self.branches)
        self.csr_layers = list(range(1, map_layer(config.csr_layers, bb.depth, VISUAL_REF_DEPTH) + 1))
        self.text_layers = list(range(1, map_layer(config.text_layers, bb.text_depth, TEXT_REF_DEPTH) + 1))
        self.csr = nn.ModuleList(
            CSRLayer(bb.width, n, config.reduction, config.gate_init) for _ in self.csr_layers
        )
        self.text_refiners = nn.ModuleList(
            GatedResidual(BottleneckMLP(bb.text_width, config.reduction), config.gate_init)
            for _ in self.text_layers
        )
        self.crm = CRM(bb.embed_dim, config.attention_dim) if n > 1 and config.fusion == "crm" else None

    @property
    def logit_scale(self) -> float:
        """s of the CE logits (Eq. 23-25)."""
        return self.config.logit_scale if self.config.logit_scale is not None else self.backbone.logit_scale

    # ------------------------------------------------------------------ text
    def class_text(self, class_names: Sequence[str]) -> torch.Tensor:
        """[t̃0, t̃1] per class through the refined text tower, with gradients: (C, 2, E)."""
        prompt_set = PROMPT_SETS[self.config.prompt_set]
        pairs = [core_clip_prompts(c, prompt_set) for c in class_names]
        flat = [p for normal, anomalous in pairs for p in (*normal, *anomalous)]
        adapters = dict(zip(self.text_layers, self.text_refiners, strict=True))
        embeddings = self.backbone.encode_text(self.backbone.tokenize(flat), adapters=adapters)  # (C·P, E)
        out, start = [], 0
        for normal, anomalous in pairs:
            split = start + len(normal)
            end = split + len(anomalous)
            out.append(prompt_anchor_pair(embeddings[start:split], embeddings[split:end]))
            start = end
        return torch.stack(out)  # (C, 2, E)

    @torch.no_grad()
    def frozen_text(self, class_names: Sequence[str]) -> torch.Tensor:
        """[t̃0, t̃1] of each name (B, 2, E), cached per class while the text parameters are unchanged."""
        return self.cached_anchors(class_names, self.class_text, self.text_refiners.parameters())

    # ------------------------------------------------------------------ image
    def encode_branches(self, views: torch.Tensor, branch_ids: Sequence[int] | None = None) -> BranchFeatures:
        """One batched forward of stacked views through the CSR-adapted tower (Eq. 11-12).

        Args:
            views: (k, B, 3, S, S), view j for branch ``branch_ids[j]`` (default: all branches in order).
        """
        k, b = views.shape[:2]
        adapters: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] = {
            i: functools.partial(layer, branch_ids=branch_ids)
            for i, layer in zip(self.csr_layers, self.csr, strict=True)
        }
        out = self.backbone.encode_image(views.flatten(0, 1), adapters=adapters)  # type: ignore[arg-type]
        tokens = self.backbone.project(out.final)  # (k·B, 1+N, E)
        tokens = F.normalize(tokens, dim=-1).unflatten(0, (k, b)).transpose(0, 1)  # (B, k, 1+N, E)
        return BranchFeatures(cls=tokens[:, :, 0], patches=tokens[:, :, 1:])

    def branch_weights(self, text: torch.Tensor, branch_cls: torch.Tensor) -> torch.Tensor:
        """α (B, n): CRM (Eq. 21), uniform for "mean" fusion, 1 for a single branch."""
        if self.crm is None:
            n = branch_cls.shape[1]
            return branch_cls.new_full(branch_cls.shape[:2], 1.0 / n)
        return self.crm(text[:, 1], branch_cls)

    def forward_batch(self, images: torch.Tensor, class_names: list[str], support: Any) -> BatchPrediction:
        """Scores (B,) (Eq. 30) and maps (B, S, S) (Eq. 31-32); every branch sees the unmasked image."""
        text = self.frozen_text(class_names)  # (B, 2, E)
        views = images.unsqueeze(0).expand(len(self.branches), *images.shape)  # (n, B, 3, S, S)
        feats = self.encode_branches(views)
        alpha = self.branch_weights(text, feats.cls)  # (B, n)
        scores = image_score(crm_fuse(alpha, feats.cls), text)  # (B,)
        margins = fused_margins(alpha, patch_margins(feats.patches, text))  # (B, N)
        grid = margins.reshape(-1, 1, *self.backbone.grid)  # (B, 1, gh, gw)
        size = (self.backbone.image_size, self.backbone.image_size)
        maps = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]  # (B, S, S)
        return BatchPrediction(scores, maps)

    # ------------------------------------------------------------------ training
    def training_stages(self) -> list[Stage]:
        return [
            Stage(
                name="text",
                parameters=lambda: list(self.text_refiners.parameters()),
                loss=self.text_stage_loss,
                config=self.schedule.text,
                needs_progress=True,
            ),
            Stage(
                name="image",
                parameters=lambda: [
                    *self.csr.parameters(),
                    *([] if self.crm is None else self.crm.parameters()),
                ],
                loss=self.image_stage_loss,
                config=self.schedule.image,
                select=self._select_image,
            ),
        ]

    def collate(self, samples: list[Sample], augment: bool) -> ContextBatch:
        """The default collation plus which images have a subject mask."""
        batch = super().collate(samples, augment)
        has_subject = torch.tensor([s.subject_mask is not None for s in samples], dtype=torch.bool)
        return ContextBatch(
            **{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}, has_subject=has_subject
        )

    def _select_image(self, dataset: Dataset) -> Dataset:
        """Warn when the subject/context branches would get no subject masks to learn from."""
        if len(self.branches) > 1 and not any(r.subject_mask_path is not None for r in dataset.records):
            warnings.warn(
                f"core-clip: {dataset.name} has no subject masks, so only the global branch learns; "
                "use branches=('g',) (single-branch mode, as the paper does for MVTec AD / VisA)",
                stacklevel=2,
            )
        return dataset

    def visual_class_token(self, images: torch.Tensor) -> torch.Tensor:
        """v_cls of L_ground / L_calib, without gradient: (B, E) unit norm."""
        with torch.no_grad():
            if self.config.ground_source == "clip":
                return F.normalize(self.backbone.encode_image(images, cls_only=True).cls, dim=-1)
            g = self.branches.index("g")
            return self.encode_branches(images[None], branch_ids=[g]).cls[:, 0]

    def text_stage_loss(
        self, batch: TrainBatch, progress: TrainProgress | None = None
    ) -> dict[str, torch.Tensor]:
        """Stage 1 (Eq. 14-17, + Eq. 33 if λ_calib > 0): refine the text tower; the visual side is frozen.

        progress: where the text stage stands (the engine passes it), for the λ_ortho warm-up; None
        (a call outside training) applies the full λ_ortho.
        """
        c = self.config
        batch = batch.to(self.device)
        names = list(dict.fromkeys(batch.class_names))
        per_class = self.class_text(names)  # (C, 2, E)
        text = per_class[[names.index(n) for n in batch.class_names]]  # (B, 2, E)
        v_cls = self.visual_class_token(batch.images)  # (B, E)
        ortho, cons = orthogonality_loss(per_class), consistency_loss(per_class)
        ground = grounding_loss(v_cls, text)
        calib = calibration_loss(v_cls, text, batch.labels, c.calib_margin) if c.calib_weight > 0 else None
        warmup = 1.0 if progress is None else warmup_factor(progress.fraction, c.ortho_warmup)
        loss = text_objective(
            ortho,
            cons,
            ground,
            (warmup * c.ortho_weight, c.cons_weight, c.ground_weight),
            calib,
            c.calib_weight,
        )
        terms = {"ortho": ortho.detach(), "cons": cons.detach(), "ground": ground.detach()}
        if calib is not None:
            terms["calib"] = calib.detach()
        return {"loss": loss, **terms, "ortho_warmup": torch.tensor(warmup)}

    def training_views(self, batch: ContextBatch) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Eq. (10): the stacked training views, which (branch, image) pairs count, and their branches.

        Returns:
            views (k, B, 3, S, S), valid (k, B) bool, branch ids (k indices into `branches`). Images
            without a subject mask feed the unmasked image to the subject/context branches and only their
            global branch counts; a batch where no image has one runs the global branch alone.
        """
        x = batch.images
        b = x.shape[0]
        if batch.has_subject is not None:
            has = batch.has_subject.to(x.device)
        else:  # a batch from another collate: subject masks, when present, are taken as given
            has = torch.full((b,), batch.subject_masks is not None, dtype=torch.bool, device=x.device)
        if batch.subject_masks is None or not bool(has.any()):
            if "g" not in self.branches:
                raise ValueError(
                    f"core-clip: branches {self.branches} have no global branch and the batch has no "
                    "subject masks to build subject/context views from"
                )
            return x[None], torch.ones((1, b), dtype=torch.bool, device=x.device), [self.branches.index("g")]
        subject = torch.where(has[:, None, None], batch.subject_masks, torch.ones_like(batch.subject_masks))
        s_view, c_view = masked_views(x, subject, self._mask_fill(x))  # (B, 3, S, S) each
        c_view = torch.where(has[:, None, None, None], c_view, x)
        views = {"s": s_view, "c": c_view, "g": x}
        valid = torch.stack([torch.ones_like(has) if br == "g" else has for br in self.branches])  # (n, B)
        return torch.stack([views[br] for br in self.branches]), valid, list(range(len(self.branches)))

    def _mask_fill(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.mask_fill == "zero":
            return x.new_zeros(())
        mean = torch.tensor(self.backbone.mean, device=x.device, dtype=x.dtype)
        std = torch.tensor(self.backbone.std, device=x.device, dtype=x.dtype)
        return (-mean / std).view(1, 3, 1, 1)  # black pixels, normalised

    def image_stage_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Stage 2 (Eq. 23-28): branch CE, fused CE, fuse-cons and fuse-ent; the text is frozen."""
        c = self.config
        batch = batch.to(self.device)
        if not isinstance(batch, ContextBatch):
            batch = ContextBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)})
        text = self.frozen_text(batch.class_names)  # (B, 2, E)
        views, valid, branch_ids = self.training_views(batch)
        feats = self.encode_branches(views, branch_ids)
        scale = self.logit_scale
        branch_cos = compatibility(feats.cls, text)  # (B, k, 2)
        branch_logits = scale * branch_cos
        labels = batch.labels
        branch_ce = sum(
            compatibility_ce(branch_logits[valid[j], j], labels[valid[j]])
            for j in range(len(branch_ids))
            if bool(valid[j].any())
        )
        # Fusion needs every branch: images without a subject mask only train the global branch.
        full = valid.all(dim=0) if len(branch_ids) == len(self.branches) else torch.zeros_like(valid[0])
        zero = branch_cos.new_zeros(())
        fuse_ce, fuse_cons, fuse_ent = zero, zero, zero
        if bool(full.any()):
            alpha = self.branch_weights(text[full], feats.cls[full])  # (B', n)
            fused = F.normalize(crm_fuse(alpha, feats.cls[full]), dim=-1)[:, None]  # (B', 1, E)
            fused_cos = compatibility(fused, text[full])[:, 0]  # (B', 2)
            fuse_ce = compatibility_ce(scale * fused_cos, labels[full])
            if c.fuse_cons_space == "cosine":
                fuse_cons = fuse_consistency_loss(fused_cos, branch_cos[full])
            else:
                fuse_cons = fuse_consistency_loss(scale * fused_cos, branch_logits[full])
            fuse_ent = negative_entropy(alpha)
        weights = (c.branch_weight, c.fuse_img_weight, c.fuse_cons_weight, c.fuse_ent_weight)
        loss = image_objective(branch_ce, fuse_ce, fuse_cons, fuse_ent, weights)
        return {
            "loss": loss,
            "branch_ce": torch.as_tensor(branch_ce).detach(),
            "fuse_ce": fuse_ce.detach(),
            "fuse_cons": fuse_cons.detach(),
            "fuse_ent": fuse_ent.detach(),
        }


# ---------------------------------------------------------------------------------------------- helpers


def _check_config(config: CoReCLIPConfig) -> None:
    problems = []
    if not config.branches or any(b not in BRANCHES for b in config.branches):
        problems.append(f"branches must be a non-empty subset of {BRANCHES}, got {config.branches}")
    elif len(set(config.branches)) != len(config.branches):
        problems.append(f"branches repeat: {config.branches}")
    if config.fusion not in FUSIONS:
        problems.append(f"fusion must be one of {FUSIONS}, got {config.fusion!r}")
    if config.prompt_set not in PROMPT_SETS:
        problems.append(f"prompt_set must be one of {tuple(PROMPT_SETS)}, got {config.prompt_set!r}")
    if config.mask_fill not in MASK_FILLS:
        problems.append(f"mask_fill must be one of {MASK_FILLS}, got {config.mask_fill!r}")
    if config.ground_source not in GROUND_SOURCES:
        problems.append(f"ground_source must be one of {GROUND_SOURCES}, got {config.ground_source!r}")
    if config.ground_source == "global" and "g" not in config.branches:
        problems.append("ground_source 'global' needs the global branch 'g'")
    if config.fuse_cons_space not in FUSE_CONS_SPACES:
        problems.append(f"fuse_cons_space must be one of {FUSE_CONS_SPACES}, got {config.fuse_cons_space!r}")
    if not 0.0 <= config.ortho_warmup <= 1.0:
        problems.append(f"ortho_warmup must be in [0, 1], got {config.ortho_warmup}")
    if config.csr_layers < 1 or config.text_layers < 1 or config.attention_dim < 1:
        problems.append("csr_layers, text_layers and attention_dim must be >= 1")
    if problems:
        raise ValueError("core-clip: " + "; ".join(problems))
