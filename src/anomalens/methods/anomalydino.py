"""AnomalyDINO (Damm et al., "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with DINOv2",
WACV 2025): training-free few-shot detection by nearest-neighbour search over DINOv2 patch features.

Written from the paper and checked against the official code (dammsi/AnomalyDINO, Apache-2.0; read,
never copied; file references in ``docs/methods/anomalydino.md``):

* patch features: last DINOv2 block with the final norm, patch tokens only, at 448 px (short side);
* memory bank: the patch features of the K normal images, each also rotated by 45°, 90°, …, 315°
  ("agnostic" preprocessing: `rotate_image`), all patches kept (the official default does not mask
  the reference images);
* zero-shot masking of the test image: first principal component of its own patch features > 10,
  flipped when the centre crop is mostly background, then a 3×3 dilation and closing
  (`background_mask`); applied per object class as the official table does (`MASKED_CLASSES`);
* patch distance: cosine distance 1 − cos to the nearest bank patch (`nearest_cosine_distance`);
  background patches get 0;
* image score: mean of the top 1 % patch distances (`mean_top_fraction`);
* map: patch distances upsampled bilinearly to each image's own size, then a Gaussian of σ = 4 pixels
  there (`finish_map`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomalens.backbones import TEST_TINY_DINO, DinoBackbone, load_dino
from anomalens.methods.base import DEFAULT, BatchPrediction, Method, register, resolve_device

# Entries of the (queries × bank) similarity block computed at once.
NN_CHUNK = 1 << 24
# Images per DINO forward pass when building the memory bank (K shots × 8 rotations can be many).
BANK_BATCH = 16
# Classes the official "agnostic"/"informed" preprocessing masks (src/utils.py `get_dataset_info`):
# MVTec AD objects whose PCA mask passes the paper's masking test, and every VisA class.
MASKED_CLASSES = frozenset(
    {"capsule", "hazelnut", "pill", "screw", "toothbrush"}
    | {"candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2"}
    | {"pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"}
)
MASKING_MODES = ("policy", "on", "off")


@dataclass(frozen=True)
class AnomalyDINOConfig:
    """Options of `AnomalyDINO`.

    Attributes:
        image_size: input side S (official ``--resolution 448``); the grid is S // patch.
        masking: "policy" = mask the test image's background for the classes in `MASKED_CLASSES`
            (official agnostic preprocessing), "on" = always, "off" = never.
        rotation: add rotated copies of each support image to the memory bank (official agnostic).
        angles: rotation angles in degrees (counter-clockwise; 0 keeps the image itself).
        mask_threshold: threshold on the first principal component score.
        mask_border: fraction of the grid cut from each side for the centre check.
        mask_min_centre: the mask is flipped when it keeps at most this fraction of the centre.
        mask_kernel: side of the square dilation / closing element, in patches.
        top_fraction: fraction of patches averaged into the image score (official: 1 %).
        sigma: Gaussian smoothing of the map in pixels of the input image (0 = none).
        official_compat: dilate and close the mask in raster order as the official code does
            (`background_mask` ``raster``), for parity; the default works on the patch grid.
    """

    image_size: int = 448
    masking: str = "policy"
    rotation: bool = True
    angles: tuple[float, ...] = (0, 45, 90, 135, 180, 225, 270, 315)
    mask_threshold: float = 10.0
    mask_border: float = 0.2
    mask_min_centre: float = 0.35
    mask_kernel: int = 3
    top_fraction: float = 0.01
    sigma: float = 4.0
    official_compat: bool = False


# ---------------------------------------------------------------------- equations
def rotate_image(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate an (H, W, 3) uint8 image by ``angle`` degrees counter-clockwise about (W/2, H/2), same size.

    The geometry of OpenCV's ``warpAffine(getRotationMatrix2D((W/2, H/2), angle, 1))``: output pixel
    (x, y) samples the input at R⁻¹·(x − cx, y − cy) + (cx, cy), bilinearly, with reflect-101 borders
    (``gfedcb|abcdefgh``), rounded back to uint8. OpenCV interpolates in fixed point (1/32 pixel), so
    values may differ from it by a grey level or two.
    """
    h, w = image.shape[:2]
    if h < 2 or w < 2:
        raise ValueError(f"rotate_image: image of {h}x{w} pixels is too small to rotate")
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = w / 2, h / 2
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    # Inverse of [[cos, sin], [-sin, cos]] applied about the centre.
    src_x = cos * (xs - cx) - sin * (ys - cy) + cx  # (H, W)
    src_y = sin * (xs - cx) + cos * (ys - cy) + cy  # (H, W)
    grid = torch.stack([2 * src_x / (w - 1) - 1, 2 * src_y / (h - 1) - 1], dim=-1)[None]  # (1, H, W, 2)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].double()  # (1, 3, H, W)
    # align_corners=True reflects about the first/last pixel centres, i.e. reflect-101.
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def first_principal_component(features: torch.Tensor) -> torch.Tensor:
    """Scores of each row on the first principal component of the rows (sklearn PCA(n_components=1)).

    The component's sign follows sklearn ≥ 1.5 (``svd_flip`` on Vᵀ): its largest-magnitude entry is
    positive.

    Args:
        features: (B, N, C) patch features, one PCA per image.

    Returns:
        (B, N) projections of the centred rows on the component.
    """
    x = features.double()
    centred = x - x.mean(dim=1, keepdim=True)  # (B, N, C)
    _, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)  # ascending eigenvalues
    component = vectors[..., -1]  # (B, C)
    peak = component.gather(1, component.abs().argmax(dim=1, keepdim=True))  # (B, 1)
    component = component * torch.sign(peak)
    return (centred @ component[..., None])[..., 0].to(features.dtype)  # (B, N)


def background_mask(
    scores: torch.Tensor,
    grid: tuple[int, int],
    threshold: float = 10.0,
    border: float = 0.2,
    min_centre: float = 0.35,
    kernel: int = 3,
    raster: bool = False,
) -> torch.Tensor:
    """Zero-shot foreground mask of the official code from first-component scores.

    mask = score > threshold; if it keeps at most ``min_centre`` of the centre crop (``border`` of the
    grid cut from each side), the object is taken to be on the other side: mask = −score > threshold.
    Then a ``kernel``² dilation and a closing (dilation, erosion) on the patch grid; patches outside
    the grid never count.

    Args:
        scores: (B, N) first-component scores, N = gh·gw row-major.
        grid: (gh, gw).
        raster: the official code's morphology: it dilates and closes the (N, 1) column of patches in
            raster order, so the element spans ``kernel`` consecutive patches of the flattened grid
            (wrapping from one row's end to the next row's start) instead of a square on the grid.

    Returns:
        (B, N) bool, True = foreground patch (kept).
    """
    gh, gw = grid
    maps = scores.view(-1, gh, gw)  # (B, gh, gw)
    mask = maps > threshold
    centre = mask[:, int(gh * border) : int(gh * (1 - border)), int(gw * border) : int(gw * (1 - border))]
    flip = centre.flatten(1).sum(dim=1) <= centre[0].numel() * min_centre  # (B,)
    mask = torch.where(flip[:, None, None], -maps > threshold, mask).float()[:, None]  # (B, 1, gh, gw)
    size, pad = (kernel, kernel), (kernel // 2, kernel // 2)
    if raster:
        mask = mask.view(-1, 1, gh * gw, 1)  # (B, 1, N, 1)
        size, pad = (kernel, 1), (kernel // 2, 0)

    def dilate(m: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(m, size, stride=1, padding=pad)

    mask = dilate(mask)
    mask = -dilate(-dilate(mask))  # closing: dilation then erosion
    return mask[:, 0].flatten(1) > 0.5


def nearest_cosine_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = NN_CHUNK) -> torch.Tensor:
    """Cosine distance 1 − cos(q, m) of each query row to its nearest bank row (official
    ``knn_metric="L2_normalized"``: faiss squared L2 of unit vectors / 2).

    Args:
        queries: (Q, D).
        bank: (M, D).
        chunk: most entries of the (Q × m) similarity block computed at once.

    Returns:
        (Q,) distances.
    """
    q = F.normalize(queries.float(), dim=-1)
    best = torch.full((q.shape[0],), -math.inf, device=q.device)
    for part in F.normalize(bank.float(), dim=-1).split(max(1, chunk // max(1, q.shape[0]))):
        best = torch.maximum(best, (q @ part.T).amax(dim=1))  # (Q,)
    return 1.0 - best


def mean_top_fraction(distances: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Image score: mean of the ⌊fraction·N⌋ largest of N patch distances, the maximum when that is 0
    (official ``mean_top1p``; the paper's empirical tail value at risk at the 99 % quantile).

    Args:
        distances: (B, N).

    Returns:
        (B,).
    """
    k = max(1, int(distances.shape[1] * fraction))
    return distances.topk(k, dim=1).values.mean(dim=1)


# ---------------------------------------------------------------------- method
@register("anomalydino")
class AnomalyDINO(Method):
    """AnomalyDINO: DINOv2 patch nearest-neighbour distances to the (rotated) K normal images."""

    config_class = AnomalyDINOConfig
    default_backbone = "vit_small_patch14_dinov2.lvd142m"
    default_pretrained = "timm"
    needs_support = True
    backbone_kind = "dino"

    def __init__(self, config: AnomalyDINOConfig, backbone: DinoBackbone):
        super().__init__(config, backbone)
        if config.masking not in MASKING_MODES:
            raise ValueError(f"anomalydino: masking must be one of {MASKING_MODES}, got {config.masking!r}")
        if not 0.0 < config.top_fraction <= 1.0:
            raise ValueError(f"anomalydino: top_fraction must be in (0, 1], got {config.top_fraction}")
        if config.mask_kernel < 1 or config.mask_kernel % 2 == 0:
            raise ValueError(
                f"anomalydino: mask_kernel must be a positive odd number, got {config.mask_kernel}"
            )

    @classmethod
    def build(
        cls,
        backbone: str | None = None,
        pretrained: str | None = DEFAULT,
        device: str = "auto",
        **options: Any,
    ) -> AnomalyDINO:
        config = cls.make_config(**options)
        name = backbone or cls.default_backbone
        if name != TEST_TINY_DINO and not timm.is_model(name):
            raise ValueError(
                f"anomalydino runs on a DINOv2 backbone (a timm name such as {cls.default_backbone}, "
                f"or {TEST_TINY_DINO}); got backbone {name!r}"
            )
        tag = cls.default_pretrained if pretrained == DEFAULT else pretrained
        dev = resolve_device(device)
        dino = load_dino(name, tag, device=dev, image_size=config.image_size)
        return cls(config, dino).to(dev).eval()

    # ------------------------------------------------------------------ support
    def support_images(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Each support image, followed by its rotations when ``rotation`` is on."""
        if not self.config.rotation:
            return arrays
        return [a if angle == 0 else rotate_image(a, angle) for a in arrays for angle in self.config.angles]

    @torch.no_grad()
    def prepare_support(self, images: torch.Tensor) -> torch.Tensor:
        """Memory bank (M, C): every patch feature of the (augmented) support images."""
        parts = [self.backbone.encode(chunk).flatten(0, 2) for chunk in images.split(BANK_BATCH)]
        return torch.cat(parts).float()

    # ------------------------------------------------------------------ inference
    def masked(self, class_name: str) -> bool:
        """Whether the test images of ``class_name`` get the zero-shot background mask."""
        if self.config.masking != "policy":
            return self.config.masking == "on"
        return class_name.strip().lower().replace(" ", "_") in MASKED_CLASSES

    @torch.no_grad()
    def forward_batch(
        self, images: torch.Tensor, class_names: list[str], support: torch.Tensor
    ) -> BatchPrediction:
        """(B, 3, s, s) → scores (B,) = mean of the top patch distances, maps (B, gh, gw) of patch
        distances (0 on masked background); `finish_map` smooths them at each image's size."""
        c = self.config
        features = self.backbone.encode(images).float()  # (B, gh, gw, C)
        b, gh, gw, _ = features.shape
        features = features.flatten(1, 2)  # (B, N, C)
        distances = nearest_cosine_distance(features.flatten(0, 1), support).view(b, -1)  # (B, N)
        use_mask = torch.tensor([self.masked(n) for n in class_names], device=features.device)
        if use_mask.any():
            keep = background_mask(
                first_principal_component(features),
                (gh, gw),
                c.mask_threshold,
                c.mask_border,
                c.mask_min_centre,
                c.mask_kernel,
                raster=c.official_compat,
            )  # (B, N)
            # An empty mask would leave nothing to score: keep every patch then.
            keep = keep | ~keep.any(dim=1, keepdim=True) | ~use_mask[:, None]
            distances = distances * keep
        return BatchPrediction(mean_top_fraction(distances, c.top_fraction), distances.view(b, gh, gw))

    def finish_map(self, amap: np.ndarray) -> np.ndarray:
        """Gaussian σ = ``sigma`` pixels on the map at the image's own size (official ``dists2map``)."""
        if self.config.sigma <= 0:
            return amap
        return gaussian_filter(amap, sigma=self.config.sigma).astype(np.float32)
