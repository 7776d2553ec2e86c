"""Frozen DINOv2 (timm) patch features, for Crane's D-Attn (paper 003 Eq. 5) and AnomalyDINO.

Features follow the official Crane and AnomalyDINO code: last block *with* the final norm (DINOv2's
``get_intermediate_layers`` default; timm needs ``norm=True``, which is what ``forward_features`` gives),
patch tokens only (CLS and registers dropped). Crane feeds the CLIP input tensor un-normalised, clamped
to [0, 1] and re-normalised with ImageNet statistics (`DinoBackbone.patch_features`); a method whose
only backbone is DINO preprocesses images itself (`DinoBackbone.preprocess` + `DinoBackbone.encode`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from anomalens.backbones.clip import resize_images
from anomalens.backbones.registry import (
    DEFAULT_DINO,
    DINO_MEAN,
    DINO_STD,
    RANDOM_INIT_SEED,
    TEST_TINY_DINO,
    is_random,
    resolve_device,
    resolve_timm_pretrained,
    tiny_dino_kwargs,
)


class DinoBackbone(nn.Module):
    """A frozen timm ViT (DINOv2 with registers) giving normalised last-block patch tokens.

    Attributes: ``name``, ``pretrained``, ``patch_size``, ``width`` (token dim C), ``mean`` / ``std``
    (ImageNet statistics), and, when built with an ``image_size`` (S), ``image_size`` and ``grid``
    (S // patch, S // patch) of `preprocess` / `encode`.
    """

    def __init__(
        self, model: VisionTransformer, *, name: str, pretrained: str | None, image_size: int | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.pretrained = pretrained
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.width = int(model.embed_dim)
        self.mean = tuple(DINO_MEAN)
        self.std = tuple(DINO_STD)
        self.image_size = image_size
        self.grid: tuple[int, int] | None = None
        if image_size is not None:
            side = image_size // self.patch_size
            if side < 1:
                raise ValueError(
                    f"{name}: image_size {image_size} is smaller than one {self.patch_size}px patch"
                )
            self.grid = (side, side)
            self._resample_positional_embedding(self.grid)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return self.model.patch_embed.proj.weight.device

    def train(self, mode: bool = True) -> DinoBackbone:
        """The ViT stays in eval mode whatever ``mode`` is (it is frozen)."""
        self.training = mode
        self.model.eval()
        return self

    @torch.no_grad()
    def _resample_positional_embedding(self, grid: tuple[int, int]) -> None:
        """Resample the grid part of the positional embedding once, the way the official DINOv2 hub
        models do at run time: models without registers bicubic with ``scale_factor = (g + 0.1) / g0``
        and no antialiasing (``interpolate_offset=0.1``), models with registers bicubic to the size with
        antialiasing (timm's dynamic resampling does the latter for every model)."""
        model = self.model
        old = tuple(model.patch_embed.grid_size)
        if grid == old:
            return
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        pos = model.pos_embed.detach().float()  # (1, prefix + g0*g0, C)
        head, body = pos[:, :prefix], pos[:, prefix:]
        body = body.reshape(1, *old, -1).permute(0, 3, 1, 2)  # (1, C, g0, g0)
        if model.reg_token is None:
            scale = tuple((g + 0.1) / o for g, o in zip(grid, old, strict=True))
            body = F.interpolate(body, scale_factor=scale, mode="bicubic", antialias=False)
        else:
            body = F.interpolate(body, size=grid, mode="bicubic", antialias=True)
        body = body.permute(0, 2, 3, 1).reshape(1, math.prod(grid), -1)  # (1, g*g, C)
        model.pos_embed = nn.Parameter(torch.cat([head, body], dim=1).to(model.pos_embed.dtype))
        model.patch_embed.grid_size = grid
        model.patch_embed.img_size = tuple(g * self.patch_size for g in grid)

    def preprocess(self, images: Sequence[np.ndarray] | np.ndarray, resize: str = "squash") -> torch.Tensor:
        """uint8 RGB images (H, W, 3), any sizes → ImageNet-normalised (B, 3, s, s) float32 on the device:
        ``normalize(pixels(images, resize))``."""
        return self.normalize(self.pixels(images, resize))

    def pixels(self, images: Sequence[np.ndarray] | np.ndarray, resize: str = "squash") -> torch.Tensor:
        """uint8 RGB images (H, W, 3), any sizes → uint8 (B, 3, s, s) on the CPU (what a data loader
        worker computes).

        PIL bicubic resize to S×S ("squash") or short side to S then centre crop ("short_side_crop"),
        then the bottom/right pixels beyond the last whole patch are cropped (s = grid · patch), as the
        official AnomalyDINO code does.
        """
        if self.image_size is None:
            raise ValueError(f"{self.name}: preprocess needs a backbone built with image_size")
        side = self.grid[0] * self.patch_size
        return resize_images(images, self.image_size, resize)[:, :, :side, :side]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, s, s) from `pixels` → ImageNet-normalised float32 on the device."""
        x = pixels.to(self.device, torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std  # (B, 3, s, s)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Last-block, final-norm patch tokens of ImageNet-normalised (B, 3, s, s) images → (B, gh, gw, C)."""
        dtype = self.model.patch_embed.proj.weight.dtype
        tokens = self.model.forward_features(images.to(self.device, dtype))  # (B, prefix + gh*gw, C)
        patches = tokens[:, self.model.num_prefix_tokens :]  # (B, gh*gw, C)
        gh, gw = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return patches.reshape(images.shape[0], gh, gw, -1)

    def input_size(self, size: int) -> int:
        """DINO input side for a CLIP input side ``size``: the nearest multiple of the patch size
        (518 stays 518 for ViT-L/14-336 at 518, giving the same 37×37 grid as CLIP)."""
        return max(1, round(size / self.patch_size)) * self.patch_size

    def patch_features(
        self, images: torch.Tensor, clip_mean: Sequence[float], clip_std: Sequence[float]
    ) -> torch.Tensor:
        """Last-block, final-norm DINO patch tokens of CLIP-normalised images.

        Args:
            images: (B, 3, S, S) normalised with ``clip_mean`` / ``clip_std``.
            clip_mean, clip_std: the CLIP backbone's ``mean`` / ``std``.

        Returns:
            (B, gh, gw, C) with gh = gw = `input_size`(S) / patch_size. When S is not a multiple of the
            patch size the re-normalised image is resized bilinearly (align_corners=False) first.
        """
        device = self.device
        cm = torch.tensor(clip_mean, device=device).view(1, 3, 1, 1)
        cs = torch.tensor(clip_std, device=device).view(1, 3, 1, 1)
        im = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        istd = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        x = (images.to(device, torch.float32) * cs + cm).clamp(0.0, 1.0)  # (B, 3, S, S) in [0, 1]
        x = (x - im) / istd
        side = self.input_size(x.shape[-1])
        if tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)  # (B, 3, s, s)
        return self.encode(x)  # (B, gh, gw, C)


def load_dino(
    name: str = DEFAULT_DINO,
    pretrained: str | bool | None = True,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
) -> DinoBackbone:
    """Build a frozen `DinoBackbone`.

    Args:
        name: a timm model name (default ``vit_base_patch14_reg4_dinov2.lvd142m``) or ``test-tiny-dino``.
        pretrained: True / "timm" = the timm weights of ``name`` (from ``$ANOMALENS_CACHE``, the HF cache,
            or a download when the host is reachable; `WeightsUnavailableError` within seconds otherwise);
            a local file path; None / False / "none" = random weights (seeded, reproducible).
        device: "cpu", "cuda", or "auto".
        image_size: input side S of `DinoBackbone.preprocess`; the positional embedding is resampled
            once to the S // patch grid (None: keep the model's size; other sizes are resampled per call
            by timm).
    """
    path = None
    if name == TEST_TINY_DINO:
        if not is_random(pretrained):
            if not isinstance(pretrained, str) or pretrained.lower() in ("timm", "true"):
                raise ValueError(
                    "test-tiny-dino has no published weights; use pretrained=None or a local file"
                )
            path = resolve_timm_pretrained(name, pretrained)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = VisionTransformer(**tiny_dino_kwargs())
        if path is not None:
            timm.models.load_checkpoint(model, path, strict=True)
    else:
        path = resolve_timm_pretrained(name, pretrained)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            overlay = {"file": path} if path is not None else None
            model = timm.create_model(
                name,
                pretrained=path is not None,
                pretrained_cfg_overlay=overlay,
                num_classes=0,
                dynamic_img_size=True,
            )
    label = None if is_random(pretrained) else ("timm" if pretrained is True else str(pretrained))
    backbone = DinoBackbone(model, name=name, pretrained=label, image_size=image_size)
    return backbone.to(resolve_device(device))
