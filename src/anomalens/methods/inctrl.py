"""InCTRL (Zhu & Pang, CVPR 2024) and InCTRLv2 (paper 001): few-shot generalist anomaly detection and
segmentation by in-context residual learning.

A generalist model is trained once on auxiliary data; at test time it scores any new class given only K
normal images of it (the in-context support), with no retraining. Equation numbers are those of paper 001
(InCTRLv2), which restates InCTRL's residual learning in §4.2:

* Eq. (1)-(2), image-level residual: adapter φ on the CLS embedding, I_p = mean_k φ(f(x'_k)),
  F_x = φ(f(x)) − I_p (the official InCTRL code uses I_p − φ(f(x)): ``official_compat``), scored by the
  head η_ref → s_i (`prototype`, `image_residual`);
* Eq. (3)-(4), multi-layer patch residual: per selected block l, each query patch's distance to its
  nearest patch over all K support images, ``scale·(1 − cos)`` (official ``scale`` = 0.5), averaged over
  the layers → M_x (`patch_residual_maps`, `multi_layer_residual_map`), one batched, chunked matrix
  product for all queries, layers and support images;
* InCTRL v1 (official code, DESIGN §4): s_t = softmax(100·[cos(g, T_n), cos(g, T_a)])_a with the v1
  prompt set, H = s_t + s_i + M_x, final = (η_h(H) + max M_x) / 2 (`holistic_score`), loss
  focal(final) + focal(s_i);
* InCTRLv2 DASL, Eq. (6)-(9), (11): s_a from the CLS embedding and the WinCLIP text prototypes (Eq. 5);
  a per-layer patch projection φ₁ to the joint space gives S_a, S_n (softmax over [n, a] per patch,
  averaged over layers); s(x) = (1 − α)(s_i + s_a)/2 + α·max M_x; M_p = (M_x + S_a)/2; loss
  focal(s) + focal([S_n, S_a]) + dice(S_a) + dice(M_p) (Eq. 10, 12, 13);
* InCTRLv2 OASL, Eq. (14)-(16): an independent projection φ₂ trained on normal images only, M_n =
  (M_x + S'_a)/2; inference map M' = (1 − β)·M_p + β·M_n (Eq. 17), score by Eq. (9).

Support features are frozen-backbone outputs, computed once per support set (`prepare_support`, cached
by `Method.predict`) and shared by every query; the learned parts are applied on top at each call.
Predictions are batch-invariant. The official InCTRL forward regroups supports and layers across the
batch when the batch has more than one image (OFFICIAL_CODE_NOTES §3); ``official_compat=True``
reproduces that (`official_batch_layout`) for parity tests only. Choices where the papers are silent
are listed in ``docs/methods/inctrl.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import ClipBackbone
from anomalens.data.types import DataError, Dataset, Sample
from anomalens.losses import at_least_fp32, binary_focal_loss, dice_loss, focal_loss, full_precision
from anomalens.methods.base import BatchPrediction, Method, Stage, TrainBatch, TrainConfig, register
from anomalens.ops import anchor_logits, anchor_probability, nearest_similarity
from anomalens.prompts import class_word, inctrl_prompts, winclip_prompts

# Input sides of the paper backbones where they differ from the native size (paper 001 §5.1.3:
# 240 for ViT-B/16+, 518 for ViT-L/14 = InCTRL+ / InCTRLv2-L).
PAPER_IMAGE_SIZES = {"ViT-L-14": 518}
# The official v1 code gives these class words one prompt pair instead of the ensemble (CIFAR-10).
V1_SINGLE_PROMPT_WORDS = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
    "animal",
)


@dataclass(frozen=True)
class InCTRLConfig:
    """Options of InCTRL v1 (`InCTRL`).

    Attributes:
        image_size: input side S; None = the paper's size for the backbone (240 on ViT-B-16-plus-240,
            518 on ViT-L-14, else the native size). η_h's input width is the number of patches, so a
            checkpoint only loads at the size it was trained at.
        layers: 1-based blocks of the patch residuals, written for a ``ref_depth``-layer ViT (official
            ``out_layers=[7, 9, 11]``), mapped to the backbone's depth.
        ref_depth: depth the ``layers`` are written for.
        adapter_reduction: φ's bottleneck factor (official ``Adapter(640, 4)``).
        head_hidden: hidden widths of the scoring heads η_ref and η_h (official 128, 64).
        residual_scale: factor of (1 − cos) in Eq. (3) (official 0.5; the paper's Eq. 3 reads 1).
        text_scale: temperature of the text prior s_t (official fixed 100).
        train_shots: support images per query in training (official ``shot=2``).
        official_compat: reproduce the official code's defects: prototype − query residual, focal loss
            with a second sigmoid on probabilities, training supports that may include the query, and
            for batches of more than one image the official regrouping of supports and layers
            (predictions then depend on the batch: parity tests only).
        nn_chunk_mb: memory budget of one similarity block of the patch nearest-neighbour search.
    """

    image_size: int | None = None
    layers: tuple[int, ...] = (7, 9, 11)
    ref_depth: int = 12
    adapter_reduction: int = 4
    head_hidden: tuple[int, ...] = (128, 64)
    residual_scale: float = 0.5
    text_scale: float = 100.0
    train_shots: int = 2
    official_compat: bool = False
    nn_chunk_mb: int = 256


@dataclass(frozen=True)
class InCTRLv2Config:
    """Options of InCTRLv2 (`InCTRLv2`); paper 001 only, no official code exists.

    Attributes:
        image_size, layers, ref_depth, adapter_reduction, head_hidden, residual_scale, train_shots,
            nn_chunk_mb: as in `InCTRLConfig` (the paper gives no layers for v2: v1's 7, 9, 11).
        alpha: weight of the patch residual max in the image score, Eq. (9).
        beta: weight of the one-class map M_n in the inference map, Eq. (17).
        logit_scale: temperature of s_a and the semantic maps (Eq. 6, 7, 14); None = the backbone's
            CLIP logit scale.
    """

    image_size: int | None = None
    layers: tuple[int, ...] = (7, 9, 11)
    ref_depth: int = 12
    adapter_reduction: int = 4
    head_hidden: tuple[int, ...] = (128, 64)
    residual_scale: float = 0.5
    train_shots: int = 2
    nn_chunk_mb: int = 256
    alpha: float = 0.5
    beta: float = 0.75
    logit_scale: float | None = None


@dataclass(frozen=True)
class InCTRLSchedule:
    """Training-stage defaults (official `engine_IC.py`): AdamW(1e-3, weight decay 0.01), 10 epochs of
    100 balanced batches of 8 normal + 8 anomalous images (`BalancedBatchSampler`)."""

    main: TrainConfig = TrainConfig(
        epochs=10,
        batch_size=16,
        lr=1e-3,
        optimizer="adamw",
        betas=(0.9, 0.999),
        weight_decay=0.01,
        max_steps_per_epoch=100,
        sampler="balanced",
    )


@dataclass(frozen=True)
class InCTRLv2Schedule:
    """Training-stage defaults (paper 001 §5.1.3): Adam at lr 1e-3, 10 epochs, batch 48, per stage."""

    dasl: TrainConfig = TrainConfig(epochs=10, batch_size=48, lr=1e-3)
    oasl: TrainConfig = TrainConfig(epochs=10, batch_size=48, lr=1e-3)


@dataclass
class SupportFeatures:
    """Frozen features of K normal support images, for G = 1 (shared by a batch) or G = B (per query).

    Attributes:
        cls: (G, K, E) CLS embeddings (``ln_post`` + ``proj``, not normalised).
        tokens: (G, L, K·N, D) unit-norm raw patch tokens of the L residual layers, image-major.
    """

    cls: torch.Tensor
    tokens: torch.Tensor


@dataclass
class InCTRLOutputs:
    """The terms of InCTRL v1's score for B queries."""

    final: torch.Tensor  # (B,) holistic score (the prediction)
    s_i: torch.Tensor  # (B,) image-level in-context residual score
    s_t: torch.Tensor  # (B,) text prior: anomaly probability against the class's text anchors
    residual_map: torch.Tensor  # (B, N) patch-level in-context residuals M_x


@dataclass
class InCTRLv2Outputs:
    """The terms of InCTRLv2's score and maps for B queries (Eq. 9, 17)."""

    score: torch.Tensor  # (B,) s(x), Eq. (9)
    s_i: torch.Tensor  # (B,) image-level in-context residual score
    s_a: torch.Tensor  # (B,) anomaly probability against the text anchors
    residual_map: torch.Tensor  # (B, N) patch-level in-context residuals M_x
    dasl: torch.Tensor  # (B, 2, N) [S_n, S_a] of the DASL head φ₁
    oasl: torch.Tensor  # (B, 2, N) [S'_n, S'_a] of the OASL head φ₂


# ---------------------------------------------------------------------- equations
def prototype(adapted_support: torch.Tensor) -> torch.Tensor:
    """Eq. (1): I_p = (1/K) Σ_k φ(f(x'_k)). (..., K, E) adapted support embeddings → (..., E)."""
    return adapted_support.mean(dim=-2)


def image_residual(query: torch.Tensor, proto: torch.Tensor, prototype_minus_query: bool) -> torch.Tensor:
    """Eq. (2): F_x = I_x ⊖ I_p (element-wise), or I_p − I_x as the official InCTRL code computes it.

    query: (B, E) adapted query embeddings I_x; proto: (B or 1, E) prototypes I_p.
    """
    return proto - query if prototype_minus_query else query - proto


def patch_residual_maps(
    queries: torch.Tensor, memory: torch.Tensor, scale: float, chunk_elements: int = 2**26
) -> torch.Tensor:
    """Eq. (3) per layer: scale·(1 − cos) to the nearest support patch, over all K images' patches.

    Args:
        queries: (B, L, N, D) unit-norm query patch tokens of L layers.
        memory: (G, L, R, D) unit-norm support patch tokens (R = K·N), G = 1 (shared) or B (per query).
        scale: factor of (1 − cos) (official 0.5).
        chunk_elements: at most about this many similarities are held at once (queries are chunked).

    Returns:
        (B, L, N) residuals M^l_x, computed in fp32 even under autocast (in bf16, cosines near 1 would
        round away the residual).
    """
    b, n_layers, n, d = queries.shape
    g = memory.shape[0]
    with torch.autocast(queries.device.type, enabled=False):
        q, m = at_least_fp32(queries), at_least_fp32(memory)
        # One memory for the batch: (L, B·N, D) against (L, R, D), so the memory is not copied per query.
        if g == 1:
            best = nearest_similarity(q.transpose(0, 1).reshape(n_layers, b * n, d), m[0], chunk_elements)
            best = best.view(n_layers, b, n).transpose(0, 1)  # (B, L, N)
        elif g == b:
            best = nearest_similarity(q, m, chunk_elements)  # (B, L, N)
        else:
            raise ValueError(f"support memory for {g} queries given to a batch of {b}")
    return scale * (1.0 - best)


def multi_layer_residual_map(layer_maps: torch.Tensor) -> torch.Tensor:
    """Eq. (4): M_x = (1/|L|) Σ_l M^l_x. (B, L, N) → (B, N)."""
    return layer_maps.mean(dim=1)


@full_precision
def semantic_layer_maps(patch_features: torch.Tensor, anchors: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. (7) / (14): per layer and patch, softmax(scale·[cos(φ(F^l), F_n), cos(φ(F^l), F_a)]).

    patch_features: (B, L, N, E) projected patch tokens φ(F^l) (any norm); anchors: (B, 2, E) unit-norm.
    Returns (B, L, 2, N): [S^l_n, S^l_a].
    """
    logits = anchor_logits(F.normalize(patch_features, dim=-1), anchors, scale)  # (B, L, N, 2)
    return logits.softmax(dim=-1).transpose(-1, -2)


def semantic_maps(layer_maps: torch.Tensor) -> torch.Tensor:
    """Eq. (8) / (15): S = (1/|L|) Σ_l S^l. (B, L, 2, N) → (B, 2, N) = [S_n, S_a]."""
    return layer_maps.mean(dim=1)


def generalist_score(
    s_i: torch.Tensor, s_a: torch.Tensor, residual_map: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Eq. (9): s(x) = (1 − α)·(s_i + s_a)/2 + α·max(M_x). s_i, s_a: (B,); residual_map: (B, N)."""
    return (1.0 - alpha) * (s_i + s_a) / 2.0 + alpha * residual_map.amax(dim=-1)


def pixel_map(residual_map: torch.Tensor, semantic_anomaly_map: torch.Tensor) -> torch.Tensor:
    """Eq. (11): M_p = (M_x ⊕ S_a)/2 (and M_n = (M_x ⊕ S'_a)/2 of §4.3.2). Shapes (B, ...) alike."""
    return (residual_map + semantic_anomaly_map) / 2.0


def inference_map(m_p: torch.Tensor, m_n: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. (17): M' = (1 − β)·M_p + β·M_n (Φ, the upsampling, is linear and applied afterwards)."""
    return (1.0 - beta) * m_p + beta * m_n


def holistic_score(
    s_t: torch.Tensor, s_i: torch.Tensor, residual_map: torch.Tensor, head: nn.Module
) -> torch.Tensor:
    """InCTRL v1 (official code): final = (η_h(s_t + s_i + M_x) + max M_x) / 2.

    s_t, s_i: (B,) scalars broadcast onto the (B, N) residual map; ``head`` maps (B, N) → (B,).
    """
    holistic = s_t[:, None] + s_i[:, None] + residual_map  # (B, N)
    return (head(holistic) + residual_map.amax(dim=-1)) / 2.0


def official_batch_layout(
    query_tokens: torch.Tensor, support_cls: torch.Tensor, support_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official InCTRL forward's grouping of a batch (a defect, reproduced for parity only).

    It stacks supports shot-major (index s·B + q) but regroups them batch-major, and reshapes its
    (layer, batch) stack of query tokens as (batch, layer) without permuting. For B = 1 this is the
    identity.

    Args:
        query_tokens: (B, L, N, D) query patch tokens.
        support_cls: (B, K, E) per-query support CLS embeddings.
        support_tokens: (B, K, L, N, D) per-query support patch tokens.

    Returns:
        query tokens (B, L, N, D), support CLS (B, K, E) and support memory (B, L, K·N, D) as the
        official code pairs them.
    """
    b, k, n_layers, n, d = support_tokens.shape
    queries = query_tokens.transpose(0, 1).reshape(b, n_layers, n, d)
    cls = support_cls.transpose(0, 1).reshape(b, k, -1)
    memory = support_tokens.permute(2, 1, 0, 3, 4).reshape(b, n_layers, k * n, d)
    return queries, cls, memory


def v1_prompts(class_name: str) -> tuple[list[str], list[str]]:
    """InCTRL v1 prompts: the 7×22 / 4×22 ensemble, or the official single pair for CIFAR-10 words."""
    word = class_word(class_name)
    if word in V1_SINGLE_PROMPT_WORDS:
        return [f"a photo of {word} for anomaly detection."], [
            f"a photo without {word} for anomaly detection."
        ]
    return inctrl_prompts(class_name)


def image_focal_loss(scores: torch.Tensor, labels: torch.Tensor, logits: bool) -> torch.Tensor:
    """InCTRL's binary focal loss (α = 1, γ = 2) in fp32 outside autocast (CUDA autocast refuses BCE on
    probabilities). scores: (B,) probabilities (or logits); labels: (B,) 0/1."""
    with torch.autocast(scores.device.type, enabled=False):
        scores = at_least_fp32(scores)
        return binary_focal_loss(scores, labels.to(scores.dtype), logits=logits)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Φ of Eq. (12): (B, C, gh, gw) patch maps → (B, C, S, S), bilinear (align_corners=False)."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------- training data
@dataclass
class SupportPool:
    """Normal images a training collate draws per-query supports from, indexed by class."""

    dataset: Dataset
    by_class: dict[str, list[int]]


def _split_of(record_meta: tuple[tuple[str, str], ...]) -> str | None:
    meta = dict(record_meta)
    return meta.get("split", meta.get("set"))


def dasl_subset(dataset: Dataset) -> Dataset:
    """DASL / main-branch data (§5.1.1): the test split when the dataset holds both splits, else all."""
    splits = {_split_of(r.meta) for r in dataset.records}
    if {"train", "test"} <= splits:
        return dataset.subset([i for i, r in enumerate(dataset.records) if _split_of(r.meta) == "test"])
    return dataset


def oasl_subset(dataset: Dataset) -> Dataset:
    """OASL data (§4.3.2, §5.1.1): normal images of the train split if it has any, else all normals."""
    normal = [i for i, r in enumerate(dataset.records) if r.label == 0]
    train = [i for i in normal if _split_of(dataset.records[i].meta) == "train"]
    return dataset.subset(train or normal)


# ---------------------------------------------------------------------- modules
class InCTRLAdapter(nn.Module):
    """InCTRL's image adapter phi: Linear(D, D/r) -> ReLU -> Linear(D/r, D) -> ReLU, both bias-free.

    Official code (``Adapter(640, 4)``, OFFICIAL_CODE_NOTES §3), PyTorch's default init; the final ReLU
    is part of it. Parameter names match the official state dict (``fc.0.weight``, ``fc.2.weight``).
    """

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(f"InCTRLAdapter: dim {dim} // reduction {reduction} leaves no hidden unit")
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, dim, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ScoreHead(nn.Module):
    """InCTRL's scoring head: [Linear -> ReLU -> BatchNorm1d] per hidden width, then Linear(., 1) -> sigmoid.

    The official ``TransformerBasicHead`` (640->128->64->1 for eta_ref, 225->128->64->1 for eta_h) with
    PyTorch's default init. Input (..., in_dim), output (...) in (0, 1); batch-norm statistics are taken
    over all leading positions. Official checkpoint keys map as ``projection{i+1}`` -> ``linears.{i}``,
    ``bn{i+2}`` -> ``norms.{i}``; the official ``bn1`` is never used in its forward and has no
    counterpart here.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (128, 64)):
        super().__init__()
        widths = (in_dim, *hidden)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in hidden)
        self.out = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])  # (N, in_dim)
        for linear, norm in zip(self.linears, self.norms, strict=True):
            h = norm(F.relu(linear(h)))
        return torch.sigmoid(self.out(h)).reshape(lead)


# ---------------------------------------------------------------------- methods
class _InCTRLBase(Method):
    """Shared parts of InCTRL and InCTRLv2: frozen features, support cache, in-context residuals."""

    default_backbone = "ViT-B-16-plus-240"
    default_pretrained = "laion400m_e32"
    needs_support = True
    resize = "short_side_crop"
    shot_semantics = "support"  # trained once on an auxiliary dataset; K-shot = support at evaluation

    def __init__(self, config: InCTRLConfig | InCTRLv2Config, backbone: ClipBackbone):
        super().__init__(config, backbone)
        if config.train_shots < 1:
            raise ValueError(f"train_shots must be >= 1, got {config.train_shots}")
        self.layers = backbone.map_layers(config.layers, config.ref_depth)
        self.n_patches = backbone.grid[0] * backbone.grid[1]
        self.adapter = InCTRLAdapter(backbone.embed_dim, config.adapter_reduction)
        self.ref_head = ScoreHead(backbone.embed_dim, tuple(config.head_hidden))
        self._pool: SupportPool | None = None

    @classmethod
    def image_size(cls, config: InCTRLConfig | InCTRLv2Config, backbone: str) -> int | None:
        return config.image_size or PAPER_IMAGE_SIZES.get(backbone)

    @property
    def official_compat(self) -> bool:
        """True when the official InCTRL defects are reproduced (v1 option; v2 has no official code)."""
        return bool(getattr(self.config, "official_compat", False))

    # ------------------------------------------------------------------ features
    def prompts(self, class_name: str) -> tuple[list[str], list[str]]:
        """(normal, anomalous) prompts of a class."""
        raise NotImplementedError

    def text_anchors(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, E) unit-norm [T_n, T_a] prompt-ensemble prototypes (Eq. 5), cached per class name."""
        return self.prompt_anchors(class_names, self.prompts)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features of (B, 3, S, S) images: CLS embeddings (B, E), raw patch tokens (B, L, N, D)."""
        cls_only = self.backbone.depth not in self.layers
        out = self.backbone.encode_image(images, layers=self.layers, cls_only=cls_only)
        tokens = torch.stack([out.tokens[i][:, 1:] for i in self.layers], dim=1)  # (B, L, N, D)
        return out.cls, tokens

    @torch.no_grad()
    def prepare_support(self, images: torch.Tensor) -> SupportFeatures:
        """Features of K normal support images (K, 3, S, S), computed once and shared by all queries."""
        return self.support_features(images[None])

    @torch.no_grad()
    def support_features(self, support: torch.Tensor) -> SupportFeatures:
        """(G, K, 3, S, S) support images → `SupportFeatures` with G groups of K images."""
        g, k = support.shape[:2]
        cls, tokens = self.encode(support.flatten(0, 1))  # (G·K, E), (G·K, L, N, D)
        tokens = F.normalize(tokens, dim=-1).unflatten(0, (g, k))  # (G, K, L, N, D)
        memory = tokens.transpose(1, 2).flatten(2, 3)  # (G, L, K·N, D)
        return SupportFeatures(cls=cls.unflatten(0, (g, k)), tokens=memory)

    def nn_chunk_elements(self) -> int:
        """Similarities per block of the patch NN search (``nn_chunk_mb`` of fp32)."""
        return max(1, self.config.nn_chunk_mb * 2**20 // 4)

    def residuals(
        self, cls: torch.Tensor, tokens: torch.Tensor, support_cls: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In-context residuals (§4.2): s_i = η_ref(F_x) (Eq. 1-2) and M_x (Eq. 3-4).

        Args:
            cls: (B, E) query CLS embeddings; tokens: (B, L, N, D) raw query patch tokens.
            support_cls: (G, K, E); memory: (G, L, K·N, D) unit-norm support tokens (G = 1 or B).

        Returns:
            s_i (B,) and M_x (B, N).
        """
        proto = prototype(self.adapter(support_cls))  # (G, E)
        residual = image_residual(self.adapter(cls), proto, self.official_compat)  # (B, E)
        return self.ref_head(residual), self.residual_map(tokens, memory)

    def residual_map(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Eq. (3)-(4): M_x (B, N) from raw query tokens (B, L, N, D) and the support memory."""
        layer_maps = patch_residual_maps(
            F.normalize(tokens, dim=-1), memory, self.config.residual_scale, self.nn_chunk_elements()
        )  # (B, L, N)
        return multi_layer_residual_map(layer_maps)

    def grid_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, N) → (B, gh, gw)."""
        return maps.unflatten(-1, self.backbone.grid)

    # ------------------------------------------------------------------ training
    def use_support_pool(self, dataset: Dataset) -> None:
        """`Stage.support`: index `dataset`'s normal images by class, the pool `collate_with_support`
        draws per-query supports from (the official normal list: train/good + test/good)."""
        by_class: dict[str, list[int]] = {}
        for i, r in enumerate(dataset.records):
            if r.label == 0:
                by_class.setdefault(r.class_name, []).append(i)
        self._pool = SupportPool(dataset, by_class)

    def _check_pool(self, selected: Dataset) -> Dataset:
        """Every class of the stage data has enough normal supports in the pool; returns `selected`."""
        if self._pool is None:
            raise RuntimeError(f"{self.name}: no support pool (training runs through `fit`)")
        k = self.config.train_shots
        for cls in selected.class_names:
            labels = {r.label for r in selected.records if r.class_name == cls}
            need = k + 1 if 0 in labels and not self.official_compat else k
            have = len(self._pool.by_class.get(cls, []))
            if have < need:
                raise DataError(
                    f"class {cls!r} of {self._pool.dataset.name} has {have} normal images for supports; "
                    f"training {self.name} with train_shots={k} needs {need} (K besides the query)"
                )
        return selected

    def select_all(self, dataset: Dataset) -> Dataset:
        """Stage data of InCTRL v1: everything (the official normal + outlier lists)."""
        return self._check_pool(dataset)

    def collate_with_support(self, samples: list[Sample], augment: bool) -> TrainBatch:
        """`Method.collate` plus K normal supports per query, of its class, never the query itself.

        Drawn with torch's global generator (seeded by the engine, so runs and resumes repeat).
        """
        if self._pool is None:
            raise RuntimeError(f"{self.name}: training batches are built by `fit` (no support pool yet)")
        batch = self.collate(samples, augment)
        keep_query = self.official_compat
        k = self.config.train_shots
        images = []
        for s in samples:
            candidates = [
                i
                for i in self._pool.by_class.get(s.class_name, [])
                if keep_query or self._pool.dataset.records[i].path != s.path
            ]
            if len(candidates) < k:
                raise DataError(f"class {s.class_name!r}: {len(candidates)} normal images for {k} supports")
            chosen = torch.randperm(len(candidates))[:k].tolist()
            images.extend(self._pool.dataset[candidates[j]].image for j in chosen)
        support = self.backbone.preprocess(images, resize=self.resize)  # (B·K, 3, S, S)
        return dataclasses.replace(batch, support=support.unflatten(0, (len(samples), k)))

    def _zero_step(self, modules: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
        """A loss of 0 with a graph: for batches of one image, where batch-norm heads cannot train."""
        zero = sum(p.sum() for m in modules for p in m.parameters()) * 0.0
        return {"loss": zero}


@register("inctrl")
class InCTRL(_InCTRLBase):
    """InCTRL v1: text prior + image and patch in-context residuals through the holistic head η_h."""

    config_class = InCTRLConfig
    schedule_class = InCTRLSchedule

    def __init__(self, config: InCTRLConfig, backbone: ClipBackbone):
        super().__init__(config, backbone)
        self.holistic_head = ScoreHead(self.n_patches, tuple(config.head_hidden))

    def prompts(self, class_name: str) -> tuple[list[str], list[str]]:
        return v1_prompts(class_name)

    def components(
        self, images: torch.Tensor, class_names: list[str], support: SupportFeatures
    ) -> InCTRLOutputs:
        """final (B,), s_i (B,), s_t (B,) and M_x (B, N) of the official v1 formula."""
        cls, tokens = self.encode(images)
        support_cls, memory = support.cls, support.tokens
        b = images.shape[0]
        if self.config.official_compat and b > 1:
            g, n_layers, _, d = memory.shape
            k = support_cls.shape[1]
            per_query = memory.view(g, n_layers, k, self.n_patches, d).transpose(1, 2)  # (G, K, L, N, D)
            tokens, support_cls, memory = official_batch_layout(
                tokens, support_cls.expand(b, -1, -1), per_query.expand(b, -1, -1, -1, -1)
            )
        s_i, residual_map = self.residuals(cls, tokens, support_cls, memory)
        s_t = anchor_probability(
            F.normalize(cls, dim=-1), self.text_anchors(class_names), self.config.text_scale
        )
        final = holistic_score(s_t, s_i, residual_map, self.holistic_head)
        return InCTRLOutputs(final, s_i, s_t, residual_map)

    @torch.no_grad()
    def forward_batch(
        self, images: torch.Tensor, class_names: list[str], support: SupportFeatures
    ) -> BatchPrediction:
        """(B, 3, S, S) → final scores (B,) and the patch residual maps M_x (B, gh, gw)."""
        out = self.components(images, class_names, support)
        return BatchPrediction(out.final, self.grid_maps(out.residual_map))

    def loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """focal(final) + focal(s_i), InCTRL's ``BinaryFocalLoss`` (on logits only under official_compat)."""
        if batch.images.shape[0] < 2:
            return self._zero_step([self.adapter, self.ref_head, self.holistic_head])
        out = self.components(batch.images, batch.class_names, self.support_features(batch.support))
        logits = self.config.official_compat
        final = image_focal_loss(out.final, batch.labels, logits)
        image = image_focal_loss(out.s_i, batch.labels, logits)
        return {"loss": final + image, "focal_final": final.detach(), "focal_image": image.detach()}

    def training_stages(self) -> list[Stage]:
        """Official `engine_IC.py`: AdamW(1e-3), 10 epochs of 100 balanced batches of 8 normal + 8
        anomalous images (`BalancedBatchSampler`), supports from the normal list."""
        modules = nn.ModuleList([self.adapter, self.ref_head, self.holistic_head])
        return [
            Stage(
                "main",
                modules.parameters,
                self.loss,
                self.schedule.main,
                self.select_all,
                self.collate_with_support,
                support=self.use_support_pool,
            )
        ]


class PatchProjection(nn.Module):
    """φ₁ / φ₂ of InCTRLv2 (Eq. 7, 14): one linear map per layer, raw tokens (width) → joint space (E)."""

    def __init__(self, n_layers: int, width: int, embed_dim: int):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(width, embed_dim) for _ in range(n_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, N, width) → (B, L, N, E)."""
        return torch.stack([lin(tokens[:, i]) for i, lin in enumerate(self.linears)], dim=1)


@register("inctrlv2")
class InCTRLv2(_InCTRLBase):
    """InCTRLv2: in-context residuals + semantic-guided DASL (φ₁) and OASL (φ₂) maps, Eq. (9), (17)."""

    config_class = InCTRLv2Config
    schedule_class = InCTRLv2Schedule

    def __init__(self, config: InCTRLv2Config, backbone: ClipBackbone):
        super().__init__(config, backbone)
        self.dasl_projection = PatchProjection(len(self.layers), backbone.width, backbone.embed_dim)
        self.oasl_projection = PatchProjection(len(self.layers), backbone.width, backbone.embed_dim)

    def prompts(self, class_name: str) -> tuple[list[str], list[str]]:
        return winclip_prompts(class_name)

    @property
    def scale(self) -> float:
        """Temperature of Eq. (6), (7), (14): ``logit_scale`` or the backbone's CLIP logit scale."""
        return self.config.logit_scale if self.config.logit_scale is not None else self.backbone.logit_scale

    def semantic(
        self, projection: PatchProjection, tokens: torch.Tensor, anchors: torch.Tensor
    ) -> torch.Tensor:
        """Eq. (7)-(8) with φ₁, or Eq. (14)-(15) with φ₂: (B, L, N, D) tokens → (B, 2, N) [S_n, S_a]."""
        return semantic_maps(semantic_layer_maps(projection(tokens), anchors, self.scale))

    def components(
        self, images: torch.Tensor, class_names: list[str], support: SupportFeatures
    ) -> InCTRLv2Outputs:
        """score s(x) (B,), s_i, s_a (B,), M_x (B, N), [S_n, S_a] and [S'_n, S'_a] (B, 2, N)."""
        cls, tokens = self.encode(images)
        s_i, residual_map = self.residuals(cls, tokens, support.cls, support.tokens)
        anchors = self.text_anchors(class_names)  # (B, 2, E)
        s_a = anchor_probability(F.normalize(cls, dim=-1), anchors, self.scale)  # Eq. (6)
        return InCTRLv2Outputs(
            score=generalist_score(s_i, s_a, residual_map, self.config.alpha),
            s_i=s_i,
            s_a=s_a,
            residual_map=residual_map,
            dasl=self.semantic(self.dasl_projection, tokens, anchors),
            oasl=self.semantic(self.oasl_projection, tokens, anchors),
        )

    @torch.no_grad()
    def forward_batch(
        self, images: torch.Tensor, class_names: list[str], support: SupportFeatures
    ) -> BatchPrediction:
        """(B, 3, S, S) → s(x) (Eq. 9) (B,) and M' (Eq. 17) on the patch grid (B, gh, gw)."""
        out = self.components(images, class_names, support)
        m_p = pixel_map(out.residual_map, out.dasl[:, 1])
        m_n = pixel_map(out.residual_map, out.oasl[:, 1])
        return BatchPrediction(out.score, self.grid_maps(inference_map(m_p, m_n, self.config.beta)))

    def _pixel_losses(
        self, maps: torch.Tensor, combined: torch.Tensor, batch: TrainBatch
    ) -> dict[str, torch.Tensor]:
        """Eq. (12) / (16): focal([Φ(S_n), Φ(S_a)]) + dice(Φ(S_a)) + dice(Φ(M)) on images with masks."""
        keep = batch.has_mask
        size = self.backbone.image_size
        if not bool(keep.any()):
            zero = maps.sum() * 0.0
            return {"focal": zero, "dice": zero}
        semantic = upsample(self.grid_maps(maps[keep].float()), size)  # (B', 2, S, S)
        combined = upsample(self.grid_maps(combined[keep].float())[:, None], size)[:, 0]  # (B', S, S)
        masks = batch.masks[keep]
        focal = focal_loss(semantic, masks)
        dice = dice_loss(semantic[:, 1], masks) + dice_loss(combined, masks)
        return {"focal": focal, "dice": dice}

    def dasl_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Eq. (13): L_DASL = focal(s(x), y) (Eq. 10) + pixel losses of S and M_p (Eq. 12)."""
        if batch.images.shape[0] < 2:
            return self._zero_step([self.adapter, self.ref_head, self.dasl_projection])
        support = self.support_features(batch.support)
        cls, tokens = self.encode(batch.images)
        s_i, residual_map = self.residuals(cls, tokens, support.cls, support.tokens)
        anchors = self.text_anchors(batch.class_names)
        s_a = anchor_probability(F.normalize(cls, dim=-1), anchors, self.scale)  # Eq. (6)
        score = generalist_score(s_i, s_a, residual_map, self.config.alpha)
        image = image_focal_loss(score, batch.labels, logits=False)
        maps = self.semantic(self.dasl_projection, tokens, anchors)  # (B, 2, N)
        pixel = self._pixel_losses(maps, pixel_map(residual_map, maps[:, 1]), batch)
        loss = image + pixel["focal"] + pixel["dice"]
        return {"loss": loss, "focal_image": image.detach(), **{k: v.detach() for k, v in pixel.items()}}

    def oasl_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Eq. (16): pixel losses of S' and M_n on normal images (their masks are empty)."""
        support = self.support_features(batch.support)
        _, tokens = self.encode(batch.images)
        residual_map = self.residual_map(tokens, support.tokens)
        maps = self.semantic(self.oasl_projection, tokens, self.text_anchors(batch.class_names))
        pixel = self._pixel_losses(maps, pixel_map(residual_map, maps[:, 1]), batch)
        return {"loss": pixel["focal"] + pixel["dice"], **{k: v.detach() for k, v in pixel.items()}}

    def select_dasl(self, dataset: Dataset) -> Dataset:
        """Stage data of DASL (`dasl_subset`); supports come from the support pool."""
        return self._check_pool(dasl_subset(dataset))

    def select_oasl(self, dataset: Dataset) -> Dataset:
        """Stage data of OASL (`oasl_subset`); supports come from the support pool."""
        return self._check_pool(oasl_subset(dataset))

    def training_stages(self) -> list[Stage]:
        dasl = nn.ModuleList([self.adapter, self.ref_head, self.dasl_projection])
        return [
            Stage(
                "dasl",
                dasl.parameters,
                self.dasl_loss,
                self.schedule.dasl,
                self.select_dasl,
                self.collate_with_support,
                support=self.use_support_pool,
            ),
            Stage(
                "oasl",
                self.oasl_projection.parameters,
                self.oasl_loss,
                self.schedule.oasl,
                self.select_oasl,
                self.collate_with_support,
                support=self.use_support_pool,
            ),
        ]
