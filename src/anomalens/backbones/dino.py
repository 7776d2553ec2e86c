"""Frozen DINOv2 (timm) patch features, for Crane's D-Attn (paper 003 Eq. 5).

Features follow the official Crane code: last block *with* the final norm (DINOv2's
``get_intermediate_layers`` default; timm needs ``norm=True``, which is what ``forward_features`` gives),
patch tokens only (CLS and registers dropped), from the CLIP input tensor un-normalised, clamped to
[0, 1] and re-normalised with ImageNet statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

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
    (ImageNet statistics).
    """

    def __init__(self, model: VisionTransformer, *, name: str, pretrained: str | None) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.pretrained = pretrained
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.width = int(model.embed_dim)
        self.mean = tuple(DINO_MEAN)
        self.std = tuple(DINO_STD)
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
        dtype = self.model.patch_embed.proj.weight.dtype
        tokens = self.model.forward_features(x.to(dtype))  # (B, prefix + gh*gw, C), final norm applied
        patches = tokens[:, self.model.num_prefix_tokens :]  # (B, gh*gw, C)
        grid = side // self.patch_size
        return patches.reshape(x.shape[0], grid, grid, -1)  # (B, gh, gw, C)


def load_dino(
    name: str = DEFAULT_DINO,
    pretrained: str | bool | None = True,
    device: str | torch.device = "cpu",
) -> DinoBackbone:
    """Build a frozen `DinoBackbone`.

    Args:
        name: a timm model name (default ``vit_base_patch14_reg4_dinov2.lvd142m``) or ``test-tiny-dino``.
        pretrained: True / "timm" = the timm weights of ``name`` (from ``$ANOMALENS_CACHE``, the HF cache,
            or a download when the host is reachable; `WeightsUnavailableError` within seconds otherwise);
            a local file path; None / False / "none" = random weights (seeded, reproducible).
        device: "cpu", "cuda", or "auto".
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
    return DinoBackbone(model, name=name, pretrained=label).to(resolve_device(device))
