"""Frozen open_clip ViT with the extension points the anomaly-detection methods need.

`ClipBackbone` is the one place in anomalens that knows the inside of a CLIP block. It runs its own
loop over ``visual.transformer.resblocks`` (and the text blocks), reusing each block's weights
(``ln_1``, ``attn.in_proj_*``, ``attn.out_proj``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``). A block with no
override is called as is, so with no overrides the outputs equal open_clip's ``encode_image`` /
``encode_text``. Overrides (all 1-based layer indices, as in the papers):

* ``adapters[i]``: a module applied to the output of block i on all tokens (AA-CLIP, CoRe-CLIP);
* ``attention[i]``: single-path attention replacement in block i ("vv" = AA-CLIP's V-V attention);
* ``eattn``: Crane's E-Attn dual path, accumulated in the same forward pass;
* ``values_at[i]``: the per-head values of block i (for Crane's D-Attn, see `attention_output`);
* ``prompts[i]``: learnable visual prompt tokens appended at block i and kept to the end (AdaCLIP);
* text: residual adapters, learnable prompt embeddings, deep prompts, a replacement projection.

Nothing here monkey-patches open_clip modules; the model is frozen and always in eval mode.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip.model import resize_pos_embed
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer, text_global_pool
from PIL import Image
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from torchvision.transforms import InterpolationMode

from anomalens.backbones.attention import (
    ATTENTION_KINDS,
    EATTN_VARIANTS,
    eattn_output,
    single_path_attention,
)
from anomalens.backbones.registry import (
    RANDOM_INIT_SEED,
    clip_preprocess_constants,
    is_random,
    is_torchscript_archive,
    map_layers,
    register_clip_configs,
    resolve_device,
    resolve_pretrained,
)
from anomalens.losses import at_least_fp32

POS_INTERP_MODES = ("bicubic", "bilinear")
# Inference precisions of the image tower (`ClipBackbone.set_precision`).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESIZE_MODES = ("squash", "short_side_crop")
# Dynamic int8 linear layers quantise activations to 7 bits unless the CPU has VNNI: fbgemm's u8·s8
# kernels without VNNI add pairs of products in 16 bits, which saturate at 8 bits (PyTorch's own
# module always uses 7); with VNNI they accumulate in 32 bits (`_Int8Linear`).
INT8_REDUCE_RANGE = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
# Sequences per chunk in `encode_windows`.
WINDOW_CHUNK = 512


@dataclass(frozen=True)
class EAttnSpec:
    """Crane's E-Attn branch (paper 003 Eq. 3-4; official dual path).

    Attributes:
        start: first 1-based block of the branch; Z starts as the residual input of this block.
        variant: summed self-correlation terms, a key of `attention.EATTN_VARIANTS` ("qkv" = Crane).
        taps: 1-based blocks after which Z is snapshot (each ≥ start).
        alias_taps: reproduce the official aliasing: every tap holds the final Z.
    """

    start: int
    variant: str = "qkv"
    taps: Sequence[int] = ()
    alias_taps: bool = False


@dataclass
class VisualOutput:
    """What `ClipBackbone.encode_image` returns. M = 1 + N tokens (CLS first), D = ``width``.

    Attributes:
        cls: (B, embed_dim) ``ln_post(final CLS) @ proj``, not normalised.
        final: (B, M, D) output of the last block (after its adapter, if any).
        tokens: {i: (B, M, D)} raw residual stream after block i, for the requested ``layers``.
        branch: {i: (B, M, D)} E-Attn branch Z after block i, for ``eattn.taps``.
        values: {i: (B, heads, M, head_dim)} per-head values of block i, for ``values_at``.
    """

    cls: torch.Tensor
    final: torch.Tensor
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    branch: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)


def window_indices(grid: tuple[int, int], size: int | tuple[int, int], stride: int = 1) -> torch.Tensor:
    """Patch indices of every ``size`` window sliding over a ``grid`` with ``stride`` (WinCLIP).

    Patches are numbered row-major from 0 (CLS excluded). Windows are ordered row-major by their top-left
    patch.

    Returns:
        (n_win, kh·kw) long tensor.
    """
    gh, gw = grid
    kh, kw = (size, size) if isinstance(size, int) else size
    if not (1 <= kh <= gh and 1 <= kw <= gw):
        raise ValueError(f"window {kh}x{kw} does not fit the {gh}x{gw} grid")
    rows = torch.arange(0, gh - kh + 1, stride)  # (R,)
    cols = torch.arange(0, gw - kw + 1, stride)  # (Cw,)
    starts = (rows[:, None] * gw + cols[None, :]).flatten()  # (n_win,)
    offsets = (torch.arange(kh)[:, None] * gw + torch.arange(kw)[None, :]).flatten()  # (kh*kw,)
    return starts[:, None] + offsets[None, :]  # (n_win, kh*kw)


def resize_images(images: Sequence[np.ndarray] | np.ndarray, size: int, resize: str) -> torch.Tensor:
    """uint8 RGB images (H, W, 3), any sizes → uint8 (B, 3, size, size) on the CPU.

    Resizing is PIL bicubic through torchvision, as in the official pipelines: "squash" resizes to
    size×size (AA-CLIP, Crane); "short_side_crop" resizes the short side to size then centre-crops (InCTRL).
    """
    tensors = []
    for image in images:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected uint8 (H, W, 3) RGB images, got {array.dtype} {array.shape}")
        pil = _resize_pil(Image.fromarray(array), size, resize, InterpolationMode.BICUBIC)
        tensors.append(TF.pil_to_tensor(pil))  # (3, size, size) uint8
    return torch.stack(tensors)


def _resize_pil(image: Image.Image, size: int, resize: str, interpolation: InterpolationMode) -> Image.Image:
    """Resize a PIL image to size×size: squash, or short side to size then centre crop (torchvision)."""
    if resize == "squash":
        return TF.resize(image, [size, size], interpolation=interpolation)
    if resize == "short_side_crop":
        return TF.center_crop(TF.resize(image, size, interpolation=interpolation), [size, size])
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def _check_supported(model: nn.Module, name: str) -> None:
    """Refuse architectures whose blocks or pooling this wrapper does not reproduce."""
    visual = getattr(model, "visual", None)
    ok = (
        isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and hasattr(model, "token_embedding")
        and all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks)
        and all(isinstance(b, ResidualAttentionBlock) for b in model.transformer.resblocks)
    )
    if not ok:
        raise ValueError(
            f"backbone {name!r} is not a plain CLIP ViT (class-token pooling, standard attention blocks, "
            f"built-in text tower); anomalens supports e.g. ViT-B-16, ViT-B-16-plus-240, ViT-L-14(-336)"
        )


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP ViT with per-layer extension points (see the module docstring).

    Build it with `load_clip`. Attributes: ``name``, ``pretrained``, ``image_size`` (S), ``patch_size``,
    ``grid`` (gh, gw), ``depth`` / ``text_depth`` (blocks), ``width`` / ``text_width``, ``embed_dim``,
    ``heads`` / ``head_dim`` (visual), ``mean`` / ``std`` (normalisation), ``logit_scale`` (float,
    exp of the model's, 100 for OpenAI weights), ``context_length``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        pretrained: str | None,
        image_size: int | None,
        pos_interp: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        _check_supported(model, name)
        self.model = model
        visual = model.visual
        self.name = name
        self.pretrained = pretrained
        self.patch_size = int(visual.patch_size[0])
        self.native_image_size = int(visual.image_size[0])
        self.image_size = int(image_size or self.native_image_size)
        self.grid = (self.image_size // self.patch_size, self.image_size // self.patch_size)
        self.depth = len(visual.transformer.resblocks)
        self.text_depth = len(model.transformer.resblocks)
        self.width = int(visual.transformer.width)
        self.text_width = int(model.transformer.width)
        self.embed_dim = int(visual.output_dim)
        self.heads = int(visual.transformer.resblocks[0].attn.num_heads)
        self.head_dim = self.width // self.heads
        self.context_length = int(model.context_length)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.logit_scale = float(model.logit_scale.detach().exp())
        self.tokenizer = open_clip.get_tokenizer(name)
        if self.grid != tuple(visual.grid_size):
            self._resample_positional_embedding(pos_interp)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.precision = "fp32"
        self.int8_blocks: nn.ModuleList | None = None  # per visual block, in "int8" precision

    # ------------------------------------------------------------------ state

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    def train(self, mode: bool = True) -> ClipBackbone:
        """The CLIP stays in eval mode whatever ``mode`` is (it is frozen; no dropout/BN to toggle)."""
        self.training = mode
        self.model.eval()
        return self

    def set_precision(self, precision: str) -> ClipBackbone:
        """Inference precision of the image tower; the text tower and everything after the tower
        (projections, similarity heads) stay float32.

        * "fp32": as loaded.
        * "bf16" / "fp16": the image blocks run under `torch.autocast` (matmuls and attention in half
          precision; LayerNorms and the residual stream stay float32); every output is float32.
        * "int8": dynamic int8 quantisation (`torch.ao.quantization.quantize_dynamic`) of the image
          blocks' linear layers (q/k/v, out-projection, MLP); activations are quantised per call. CPU only.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "int8" and self.device.type != "cpu":
            raise ValueError(f"precision int8 runs on the CPU only (the backbone is on {self.device})")
        if precision == "fp16" and self.device.type == "cpu":
            raise ValueError("precision fp16 needs a GPU; on the CPU use bf16 or int8")
        blocks = self.model.visual.transformer.resblocks
        self.int8_blocks = nn.ModuleList(_int8_block(b) for b in blocks) if precision == "int8" else None
        self.precision = precision
        return self

    def int8_weights(self) -> list[torch.Tensor]:
        """The weights (out, in) of the linear layers that "int8" precision quantises (`_int8_block`)."""
        weights = []
        for block in self.model.visual.transformer.resblocks:
            weights += [block.attn.in_proj_weight, block.attn.out_proj.weight]
            weights += [m.weight for m in block.mlp.modules() if isinstance(m, nn.Linear)]
        return weights

    def _autocast(self) -> AbstractContextManager:
        """The autocast context of the image blocks in bf16 / fp16; otherwise nothing (a caller's own
        autocast, e.g. the training engine's AMP, stays in force)."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def _int8(self, block: nn.Module) -> nn.Module | None:
        """The int8 twin of a visual block (see `set_precision`), None for text blocks or in float."""
        if self.int8_blocks is None:
            return None
        for own, twin in zip(self.model.visual.transformer.resblocks, self.int8_blocks, strict=True):
            if own is block:
                return twin
        return None

    def map_layers(self, indices: Sequence[int], ref_depth: int, text: bool = False) -> list[int]:
        """`registry.map_layers` onto this backbone's visual (or text) depth."""
        return map_layers(indices, self.text_depth if text else self.depth, ref_depth)

    @torch.no_grad()
    def _resample_positional_embedding(self, mode: str) -> None:
        """Resample the grid part of the positional embedding to ``self.grid`` (the CLS entry is kept).

        "bicubic" uses ``antialias=True, align_corners=False`` (AA-CLIP); "bilinear" uses
        ``align_corners=False`` without antialiasing (Crane). Done once, at construction.
        """
        if mode not in POS_INTERP_MODES:
            raise ValueError(f"pos_interp must be one of {POS_INTERP_MODES}, got {mode!r}")
        visual = self.model.visual
        pos = visual.positional_embedding.detach()  # (1+N0, D)
        gh0, gw0 = visual.grid_size
        grid = pos[1:].reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2).float()  # (1, D, gh0, gw0)
        antialias = mode == "bicubic"
        grid = F.interpolate(grid, size=self.grid, mode=mode, antialias=antialias, align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1]).to(pos.dtype)  # (N, D)
        visual.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid]), requires_grad=False)
        # Keep open_clip's own bookkeeping consistent so its encode_image runs at the new size too.
        visual.grid_size = self.grid
        visual.image_size = (self.image_size, self.image_size)

    # ------------------------------------------------------------------ input

    def preprocess(self, images: Sequence[np.ndarray] | np.ndarray, resize: str = "squash") -> torch.Tensor:
        """uint8 RGB images (H, W, 3), any sizes → normalised (B, 3, S, S) float32 on the device:
        ``normalize(pixels(images, resize))``."""
        return self.normalize(self.pixels(images, resize))

    def pixels(self, images: Sequence[np.ndarray] | np.ndarray, resize: str = "squash") -> torch.Tensor:
        """uint8 RGB images (H, W, 3), any sizes → resized uint8 (B, 3, S, S) on the CPU (what a data
        loader worker computes; see `resize_images`)."""
        return resize_images(images, self.image_size, resize)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Resized uint8 (B, 3, S, S) → float32 normalised with the backbone's mean and std, on the device."""
        x = pixels.to(self.device, torch.float32).div_(255.0)  # (B, 3, S, S)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def preprocess_masks(
        self, masks: Sequence[np.ndarray] | np.ndarray, resize: str = "squash", mode: str = "nearest"
    ) -> torch.Tensor:
        """Binary masks (H, W) → (B, S, S) float32 {0, 1} on the device, with the same geometry as
        `preprocess`. ``mode="nearest"`` (AA-CLIP) or ``"bilinear"`` then ``> 0.5`` (Crane, AnomalyCLIP)."""
        modes = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR}
        if mode not in modes:
            raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
        out = []
        for mask in masks:
            array = (np.asarray(mask) > 0).astype(np.uint8) * 255  # (H, W)
            pil = _resize_pil(Image.fromarray(array), self.image_size, resize, modes[mode])
            out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0 > 0.5))  # (S, S)
        return torch.stack(out).to(self.device, torch.float32)  # (B, S, S)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → (C, context_length) long token ids on the device (open_clip's tokenizer)."""
        return self.tokenizer(list(texts)).to(self.device)

    # ------------------------------------------------------------------ block internals

    def _block(
        self, block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cls_only: bool = False
    ) -> torch.Tensor:
        """An unmodified block on batch-first ``x`` (B, M, D) with fused attention: open_clip's block
        computed with `F.scaled_dot_product_attention` instead of ``nn.MultiheadAttention`` (whose CPU
        inference fast path materialises the attention matrix). ``cls_only`` computes only the CLS row
        of the output (B, 1, D); its keys and values still come from every token."""
        q, k, v = self._qkv(block, block.ln_1(x))  # (B, heads, M, hd) each
        if cls_only:
            x, q = x[:, :1], q[:, :, :1]  # (B, 1, D), (B, heads, 1, hd)
        mask = None if attn_mask is None else attn_mask.to(q.dtype)
        x = x + block.ls_1(self._out_proj(block, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        return x + block.ls_2(self._mlp(block, block.ln_2(x)))

    def _qkv(self, block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v of ``block`` from normalised tokens ``h`` (B, M, D); each (B, heads, M, hd)."""
        b, m, d = h.shape
        heads = block.attn.num_heads
        twin = self._int8(block)
        attn = block.attn
        qkv = (
            F.linear(h, attn.in_proj_weight, attn.in_proj_bias) if twin is None else twin.qkv(h)
        )  # (B, M, 3D)
        qkv = qkv.view(b, m, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, M, hd)
        return qkv[0], qkv[1], qkv[2]

    def _values(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Per-head values of ``block`` from normalised tokens ``h`` (B, M, D) → (B, heads, M, hd)."""
        if self._int8(block) is not None:
            return self._qkv(block, h)[2]
        b, m, d = h.shape
        weight = block.attn.in_proj_weight[2 * d :]  # (D, D)
        bias = None if block.attn.in_proj_bias is None else block.attn.in_proj_bias[2 * d :]
        v = F.linear(h, weight, bias)  # (B, M, D)
        return v.view(b, m, block.attn.num_heads, -1).transpose(1, 2)  # (B, heads, M, hd)

    def _out_proj(self, block: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
        """Concatenate heads (B, heads, M, hd) and apply the block's out-projection → (B, M, D)."""
        b, h, m, hd = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(b, m, h * hd)  # (B, M, D)
        twin = self._int8(block)
        return block.attn.out_proj(merged) if twin is None else twin.out(merged)

    def _mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        twin = self._int8(block)
        return block.mlp(h) if twin is None else twin.mlp(h)

    # ------------------------------------------------------------------ image tower

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class embedding, positional embedding, ln_pre: (B, 3, S, S) → (B, 1+N, D)."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.name} expects {self.image_size}x{self.image_size} inputs (pass image_size= to "
                f"load_clip to change it), got {tuple(images.shape[-2:])}"
            )
        visual = self.model.visual
        x = visual.conv1(images.to(self.device, self.dtype))  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, 1+N, D)
        return visual.ln_pre(x)

    def post_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """Visual tokens (..., width) through ``ln_post`` only (AA-CLIP projects with its own layers)."""
        return self.model.visual.ln_post(tokens)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (C, L) → the text tower's input embeddings (C, L, text_width), for learnable prompts."""
        return self.model.token_embedding(tokens)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Visual tokens (..., width) → joint space (..., embed_dim): ``ln_post`` then ``@ proj``."""
        visual = self.model.visual
        return visual.ln_post(tokens) @ visual.proj

    def _check_layers(self, indices: Sequence[int], what: str, lo: int = 1) -> None:
        bad = [i for i in indices if not lo <= i <= self.depth]
        if bad:
            raise ValueError(f"{what}: layers {bad} outside {lo}..{self.depth} (1-based) for {self.name}")

    def encode_image(
        self,
        images: torch.Tensor,
        *,
        layers: Sequence[int] = (),
        adapters: Mapping[int, nn.Module] | None = None,
        attention: Mapping[int, str] | None = None,
        eattn: EAttnSpec | None = None,
        values_at: Mapping[int, str] | None = None,
        cls_only: bool = False,
        prompts: Mapping[int, torch.Tensor] | None = None,
    ) -> VisualOutput:
        """One forward pass of the image tower with optional per-layer overrides (1-based layers).

        Args:
            images: (B, 3, S, S) normalised images (see `preprocess`).
            layers: blocks whose output tokens to return in ``tokens``.
            adapters: ``adapters[i](x)`` replaces the output x (B, M, D) of block i; the module implements
                its own residual blending.
            attention: ``attention[i]`` ∈ `ATTENTION_KINDS` replaces block i's attention in the main
                path (MLP kept). "vv" is AA-CLIP's V-V attention (q = k = v = V); "vv-batch" the official
                code's, over the batch axis (`attention.single_path_attention`).
            eattn: Crane's E-Attn dual path. From block ``start`` on, q, k, v come from ``ln_1`` of the
                main path's block input, ``H_l = out_proj(W_l V)`` with `attention.eattn_weights`, no FFN,
                ``Z ← Z + H_l`` with Z starting as the input of block ``start``. The main path is unchanged.
            values_at: ``values_at[i]`` = "input": V of block i from ``ln_1(block input)``; "mid": from
                ``ln_1`` of the mid-block state (input + attention output, before the MLP; the state
                Crane's official D-Attn reads).
            cls_only: the caller reads only ``cls`` (and ``branch`` / input ``values``): the last block's
                main path computes the CLS row alone and ``final`` is (B, 1, D). Not allowed when the last
                block is in ``layers``, ``adapters``, ``attention`` or ``values_at`` "mid".
            prompts: learnable visual prompt tokens (AdaCLIP, VPT-deep): ``prompts[i]`` (n, D) or
                (B, n, D) enters at the input of block i. The first prompted block appends them after the
                patch tokens, later ones replace the n appended tokens; they stay in the sequence (as keys
                and values) to the last block and are left out of ``tokens`` and ``final``. Not combined
                with ``eattn`` or ``values_at``.

        Returns:
            `VisualOutput` (cls, final, tokens, branch, values).
        """
        adapters = adapters or {}
        attention = attention or {}
        values_at = values_at or {}
        prompts = prompts or {}
        self._check_layers(list(layers), "layers")
        self._check_layers(list(prompts), "prompts")
        if prompts and (eattn is not None or values_at):
            raise ValueError("prompts cannot be combined with eattn or values_at")
        if len({p.shape[-2] for p in prompts.values()}) > 1:
            raise ValueError("prompts: every layer's prompt must have the same number of tokens")
        self._check_layers(list(adapters), "adapters")
        self._check_layers(list(attention), "attention")
        self._check_layers(list(values_at), "values_at")
        for kind in attention.values():
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"attention kind {kind!r} not in {ATTENTION_KINDS}")
        for where in values_at.values():
            if where not in ("input", "mid"):
                raise ValueError(f"values_at must be 'input' or 'mid', got {where!r}")
        if eattn is not None:
            self._check_layers([eattn.start], "eattn.start")
            self._check_layers(list(eattn.taps), "eattn.taps", lo=eattn.start)
            if eattn.variant not in EATTN_VARIANTS:
                raise ValueError(f"E-Attn variant {eattn.variant!r} not in {sorted(EATTN_VARIANTS)}")
        last = self.depth
        if cls_only and (
            last in layers or last in adapters or last in attention or values_at.get(last) == "mid"
        ):
            raise ValueError(f"cls_only: block {last} (the last) is tapped, adapted or overridden")

        scale = self.head_dim**-0.5
        wanted = set(layers)
        tokens: dict[int, torch.Tensor] = {}
        branch: dict[int, torch.Tensor] = {}
        values: dict[int, torch.Tensor] = {}
        with self._autocast():
            x = self._embed(images)  # (B, M, D)
            m = x.shape[1]  # image tokens (1 + N); appended prompt tokens follow them
            z = None
            for i, block in enumerate(self.model.visual.transformer.resblocks, start=1):
                if i in prompts:
                    prompt = prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)  # (B, n, D)
                    x = torch.cat([x[:, :m], prompt], dim=1)  # (B, M + n, D)
                in_branch = eattn is not None and i >= eattn.start
                if in_branch and i == eattn.start:
                    z = x
                kind = attention.get(i, "standard")
                if kind == "standard" and not in_branch and i not in values_at:
                    x = self._block(block, x, cls_only=cls_only and i == last)
                else:
                    q, k, v = self._qkv(block, block.ln_1(x))  # (B, heads, M, hd) each
                    if in_branch:
                        branch_out = eattn_output(q, k, v, scale, eattn.variant)  # (B, heads, M, hd)
                        z = z + self._out_proj(block, branch_out)  # (B, M, D)
                    if values_at.get(i) == "input":
                        values[i] = v
                    if cls_only and i == last:  # standard attention (checked above): the CLS query alone
                        x, q = x[:, :1], q[:, :, :1]  # (B, 1, D), (B, heads, 1, hd)
                    mid = x + block.ls_1(self._out_proj(block, single_path_attention(q, k, v, scale, kind)))
                    if values_at.get(i) == "mid":
                        values[i] = self._values(block, block.ln_1(mid))
                    x = mid + block.ls_2(self._mlp(block, block.ln_2(mid)))  # (B, M or 1, D)
                if i in adapters:
                    x = adapters[i](x)
                if i in wanted:
                    tokens[i] = x[:, :m]
                if in_branch and i in eattn.taps:
                    branch[i] = z
        if eattn is not None and eattn.alias_taps:
            # Official Crane accumulates in place, so every stored tap is the final Z.
            branch = dict.fromkeys(eattn.taps, z)
        x = at_least_fp32(x[:, :m])  # half-precision blocks hand float32 to projections and heads
        return VisualOutput(
            cls=self.project(x[:, 0]),  # (B, embed_dim)
            final=x,
            tokens={i: at_least_fp32(t) for i, t in tokens.items()},
            branch={i: at_least_fp32(t) for i, t in branch.items()},
            values={i: at_least_fp32(t) for i, t in values.items()},
        )

    def attention_output(self, layer: int, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Apply attention weights to per-head values and block ``layer``'s out-projection (no residual).

        Args:
            layer: 1-based block whose ``attn.out_proj`` is used.
            weights: (B, heads or 1, M, M') attention weights (e.g. `attention.dattn_weights`).
            values: (B, heads, M', head_dim) values (e.g. ``VisualOutput.values``).

        Returns:
            (B, M, width).
        """
        self._check_layers([layer], "attention_output")
        block = self.model.visual.transformer.resblocks[layer - 1]
        heads_out = torch.matmul(weights.to(values.dtype), values)  # (B, heads, M, hd)
        return self._out_proj(block, heads_out)

    def encode_windows(
        self, images: torch.Tensor, windows: torch.Tensor, chunk: int = WINDOW_CHUNK
    ) -> torch.Tensor:
        """WinCLIP window embeddings: CLS + only the window's patch tokens (with their positional
        embeddings) through the full tower; ``ln_post(CLS) @ proj`` per window.

        All B·n_win sequences run batched, ``chunk`` sequences at a time.

        Args:
            images: (B, 3, S, S) normalised images.
            windows: (n_win, k) patch indices in 0..N-1 (see `window_indices`).

        Returns:
            (B, n_win, embed_dim), not normalised.
        """
        x = self._embed(images)  # (B, 1+N, D)
        b, _, d = x.shape
        index = windows.to(x.device).long() + 1  # (n_win, k) positions in the token sequence
        n_win, k = index.shape
        cls = x[:, :1].unsqueeze(1).expand(b, n_win, 1, d)  # (B, n_win, 1, D)
        seqs = torch.cat([cls, x[:, index]], dim=2).reshape(b * n_win, 1 + k, d)  # (B*n_win, 1+k, D)
        pooled = []
        blocks = self.model.visual.transformer.resblocks
        # An exported graph has a symbolic batch, so it runs all sequences at once (no Python loop).
        for part in [seqs] if torch.compiler.is_exporting() else seqs.split(chunk):
            with self._autocast():
                for i, block in enumerate(blocks, start=1):
                    part = self._block(block, part, cls_only=i == len(blocks))
            pooled.append(at_least_fp32(part[:, 0]))  # (chunk, D)
        return self.project(torch.cat(pooled)).view(b, n_win, -1)  # (B, n_win, embed_dim)

    # ------------------------------------------------------------------ text tower

    def encode_text(
        self,
        tokens: torch.Tensor,
        *,
        adapters: Mapping[int, nn.Module] | None = None,
        prompt_embeddings: torch.Tensor | None = None,
        deep_prompts: Mapping[int, torch.Tensor] | None = None,
        projection: nn.Module | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Text embeddings with optional learned prompts and adapters (1-based text layers).

        Args:
            tokens: (C, L) token ids; they always give the EOT position (argmax), even with
                ``prompt_embeddings``.
            adapters: ``adapters[i](x)`` replaces the output (C, L, text_width) of text block i.
            prompt_embeddings: (C, L, text_width) replaces the token embeddings (CoOp-style learnable
                prompts); the positional embedding is still added.
            deep_prompts: ``deep_prompts[i]`` (n, text_width) or (C, n, text_width) replaces positions
                1..n at the input of text block i ≥ 2 (MaPLe / Crane: layers 2..9 of 12).
            projection: replaces CLIP's ``text_projection`` on ``ln_final(x)[EOT]`` (AA-CLIP).
            normalize: L2-normalise the result.

        Returns:
            (C, embed_dim), or (C, projection's output dim).
        """
        model = self.model
        adapters = adapters or {}
        deep_prompts = deep_prompts or {}
        tokens = tokens.to(self.device)
        bad = [i for i in [*adapters, *deep_prompts] if not 1 <= i <= self.text_depth]
        bad += [i for i in deep_prompts if i == 1]
        if bad:
            raise ValueError(f"text layers {bad} invalid (adapters 1..{self.text_depth}, deep prompts 2..)")
        cast = model.transformer.get_cast_dtype()
        if prompt_embeddings is None:
            x = model.token_embedding(tokens)  # (C, L, Dt)
        else:
            if prompt_embeddings.shape[:2] != tokens.shape:
                raise ValueError(
                    f"prompt_embeddings {tuple(prompt_embeddings.shape)} vs tokens {tuple(tokens.shape)}"
                )
            x = prompt_embeddings
        x = x.to(cast) + model.positional_embedding.to(cast)  # (C, L, Dt)
        attn_mask = model.attn_mask
        if attn_mask is not None and model.text_pool_type == "argmax" and not torch.compiler.is_exporting():
            # Causal attention: positions after the last EOT never reach an EOT token, so dropping them
            # changes nothing (adapters act per token) and saves most of the 77-token cost. An exported
            # graph keeps all positions: the cut depends on token values, which a graph cannot branch on.
            keep = max(
                [int(tokens.argmax(dim=-1).max()) + 1] + [1 + p.shape[-2] for p in deep_prompts.values()]
            )
            x, tokens, attn_mask = x[:, :keep], tokens[:, :keep], attn_mask[:keep, :keep]
        for i, block in enumerate(model.transformer.resblocks, start=1):
            if i in deep_prompts:
                prompt = deep_prompts[i].to(x.dtype)
                prompt = prompt.expand(x.shape[0], -1, -1) if prompt.ndim == 2 else prompt  # (C, n, Dt)
                x = torch.cat([x[:, :1], prompt, x[:, 1 + prompt.shape[1] :]], dim=1)  # (C, L', Dt)
            x = self._block(block, x, attn_mask=attn_mask)
            if i in adapters:
                x = adapters[i](x)
        x = model.ln_final(x)  # (C, L, Dt)
        pooled = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=model.text_eos_id)  # (C, Dt)
        if projection is not None:
            pooled = projection(pooled)
        elif isinstance(model.text_projection, nn.Linear):
            pooled = model.text_projection(pooled)
        else:
            pooled = pooled @ model.text_projection  # (C, embed_dim)
        return F.normalize(pooled, dim=-1) if normalize else pooled


def _int8_block(block: nn.Module) -> nn.Module:
    """Dynamically int8-quantised copies of a block's linear layers: ``qkv`` (the packed in-projection),
    ``out`` (out-projection) and ``mlp``; weights per tensor, activations quantised on the fly."""
    attn = block.attn
    d = attn.embed_dim
    qkv = nn.Linear(d, 3 * d, bias=attn.in_proj_bias is not None)
    out = nn.Linear(d, d, bias=attn.out_proj.bias is not None)
    with torch.no_grad():
        qkv.weight.copy_(attn.in_proj_weight)
        out.weight.copy_(attn.out_proj.weight)
        if qkv.bias is not None:
            qkv.bias.copy_(attn.in_proj_bias)
        if out.bias is not None:
            out.bias.copy_(attn.out_proj.bias)
    twin = nn.ModuleDict({"qkv": qkv, "out": out, "mlp": copy.deepcopy(block.mlp)})
    # torch.ao.quantization and quantised tensors announce their deprecation (docs/performance.md).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(twin, {nn.Linear}, dtype=torch.qint8, mapping={nn.Linear: _Int8Linear})


class _Int8Linear(quantized_dynamic.Linear):
    """PyTorch's dynamic int8 linear layer (int8 weights per tensor) whose activations use the full
    8 bits where that is safe (`INT8_REDUCE_RANGE`). AA-CLIP on ViT-B-16, 6 seeds: max |Δ score| vs fp32
    halved, |Δ pixel AUROC| at most 0.25 points instead of 0.89 (docs/performance.md §3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_params._packed_params
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=INT8_REDUCE_RANGE).to(x.dtype)


class _RandomInitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def _drop_random_init_warning(enabled: bool) -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning (random weights asked for, or loaded right after)."""
    log_filter = _RandomInitFilter()
    if enabled:
        logging.getLogger().addFilter(log_filter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(log_filter)


def load_clip(
    name: str,
    pretrained: str | None = None,
    image_size: int | None = None,
    pos_interp: str = "bicubic",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
) -> ClipBackbone:
    """Build a frozen `ClipBackbone` from an open_clip model name.

    Args:
        name: open_clip model name ("ViT-B-16", "ViT-B-16-plus-240", "ViT-L-14-336", "test-tiny", ...).
        pretrained: an open_clip tag ("openai", "laion400m_e32"), a local checkpoint file (open_clip
            state dict, safetensors, or an OpenAI JIT archive), or None/"none" for random weights
            (seeded with `registry.RANDOM_INIT_SEED`, so they are the same in every process). Missing
            weights fail within seconds (`registry.resolve_pretrained`).
        image_size: input side S; when it differs from the native size the positional embedding is
            resampled once with ``pos_interp`` ("bicubic" + antialias = AA-CLIP, "bilinear" = Crane).
        device: "cpu", "cuda", "cuda:1", or "auto".
        precision: "fp32", "fp16" or "bf16" (open_clip's ``precision``).
        quick_gelu: activation; None = what the weights were trained with (True for OpenAI tags,
            the config's value otherwise). AA-CLIP's official code runs OpenAI weights with exact GELU
            (``quick_gelu=False``).
    """
    register_clip_configs()
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP backbone {name!r}; e.g. ViT-B-16, ViT-B-16-plus-240, ViT-L-14-336, test-tiny"
        )
    if pos_interp not in POS_INTERP_MODES:
        raise ValueError(f"pos_interp must be one of {POS_INTERP_MODES}, got {pos_interp!r}")
    path = resolve_pretrained(name, pretrained)
    is_tag = path is not None and open_clip.get_pretrained_cfg(name, str(pretrained)) != {}
    tag_cfg = open_clip.get_pretrained_cfg(name, str(pretrained)) if is_tag else {}
    model_cfg = open_clip.get_model_config(name)
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False)))
    jit = path is not None and is_torchscript_archive(path)
    # The warning is noise for random weights asked for on purpose and for JIT files loaded below.
    with torch.random.fork_rng(devices=[]), _drop_random_init_warning(enabled=jit or path is None):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = open_clip.create_model(
            name, pretrained=None if jit else path, precision=precision, quick_gelu=quick_gelu
        )
    if jit:
        # OpenAI's original JIT archives (torch.load(weights_only=True) refuses them); TorchScript
        # deserialisation runs no arbitrary Python, unlike unpickling.
        state = torch.jit.load(path, map_location="cpu").state_dict()
        # Archives also hold non-parameters (input_resolution, attn_mask, ...); missing keys still fail.
        expected = model.state_dict().keys()
        state = {k: v for k, v in state.items() if k in expected}
        resize_pos_embed(state, model)  # open_clip's own resampling to the native grid, as for other files
        model.load_state_dict(state, strict=True)
    mean, std = clip_preprocess_constants(name, str(pretrained) if is_tag else None)
    backbone = ClipBackbone(
        model,
        name=name,
        pretrained=None if is_random(pretrained) else str(pretrained),
        image_size=image_size,
        pos_interp=pos_interp,
        mean=mean,
        std=std,
    )
    return backbone.to(resolve_device(device))
