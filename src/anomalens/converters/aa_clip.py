"""Official AA-CLIP checkpoints (Mwxinnn/AA-CLIP ``train.py``) → our `aa-clip` method.

The official run folder holds ``text_adapter.pth`` (stage 1) and ``image_adapter.pth`` plus one
``image_adapter_{epoch}.pth`` per epoch (stage 2), each a dict with the epoch, the adapter state and the
optimiser state (OFFICIAL_CODE_NOTES §1):

* ``text_adapter``: ``{i}.fc.0.weight`` for the K_T text adapters (i < K_T) and ``{K_T}.fc.0.weight`` for
  the learnable text projection (Linear + LeakyReLU), all bias-free;
* ``image_adapter``: ``layer_adapters.{i}.fc.0.weight`` (K_I visual adapters), ``seg_proj.{l}.fc.weight``
  (one per tap; ``fc.0.weight`` when trained with ``--relu``) and ``det_proj.fc.weight`` (idem).

A run without ``text_adapter.pth`` was trained with ``--text_epoch 0``: its anchors come from CLIP's own
text tower (``adapt_text=False``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from anomalens.methods.base import Method

TEXT_FILE = "text_adapter.pth"
IMAGE_FILE = "image_adapter.pth"
_EPOCH_FILE = re.compile(r"image_adapter_(\d+)\.pth$")
# The official code's backbone and input size; any of them can be overridden in build_options.
OFFICIAL_BUILD = {"backbone": "ViT-L-14-336", "pretrained": "openai", "image_size": 518}


def locate(path: str | os.PathLike) -> tuple[Path | None, Path]:
    """(text checkpoint or None, image checkpoint) of an official run folder or image-adapter file.

    A folder gives its ``image_adapter.pth`` (the last epoch), else its highest ``image_adapter_{e}.pth``;
    a file is the image checkpoint itself. The text checkpoint is ``text_adapter.pth`` beside it.
    """
    path = Path(path)
    if path.is_dir():
        image = path / IMAGE_FILE
        if not image.is_file():
            epochs = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _EPOCH_FILE.search(p.name)))
            if not epochs:
                raise FileNotFoundError(f"{path}: no {IMAGE_FILE} or image_adapter_<epoch>.pth (AA-CLIP run)")
            image = epochs[-1][1]
    elif path.is_file():
        image = path
    else:
        raise FileNotFoundError(f"AA-CLIP checkpoint not found: {path}")
    text = image.parent / TEXT_FILE
    return (text if text.is_file() else None), image


def _read(path: Path, key: str) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or non-checkpoint files
        raise ValueError(f"{path}: not a readable AA-CLIP checkpoint ({e})") from None
    if not isinstance(checkpoint, dict) or key not in checkpoint:
        raise ValueError(f"{path}: not an AA-CLIP checkpoint (no {key!r} entry)")
    return checkpoint[key]


def _projection_weight(state: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, bool]:
    """Weight of an official ``SimpleProj`` and whether it had the LeakyReLU (``fc.0`` vs ``fc``)."""
    if f"{prefix}.fc.0.weight" in state:
        return state[f"{prefix}.fc.0.weight"], True
    if f"{prefix}.fc.weight" in state:
        return state[f"{prefix}.fc.weight"], False
    raise ValueError(f"AA-CLIP checkpoint has no {prefix}.fc.weight / {prefix}.fc.0.weight")


def official_to_ours(
    text_state: dict[str, torch.Tensor] | None, image_state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename official adapter tensors to `AACLIP` state-dict keys.

    Returns:
        (our state dict, projector_act) where projector_act tells whether ``seg_proj``/``det_proj`` were
        trained with the LeakyReLU (official ``--relu``).
    """
    ours: dict[str, torch.Tensor] = {}
    if text_state is not None:
        indices = sorted(int(k.split(".")[0]) for k in text_state if re.fullmatch(r"\d+\.fc\.0\.weight", k))
        if not indices or indices != list(range(len(indices))):
            raise ValueError(f"AA-CLIP text_adapter: unexpected keys {sorted(text_state)[:5]}")
        *adapters, projection = indices
        for i in adapters:
            ours[f"text_adapters.{i}.fc.weight"] = text_state[f"{i}.fc.0.weight"]
        ours["text_projection.fc.weight"] = text_state[f"{projection}.fc.0.weight"]
    for key, value in image_state.items():
        if m := re.fullmatch(r"layer_adapters\.(\d+)\.fc\.0\.weight", key):
            ours[f"image_adapters.{m.group(1)}.fc.weight"] = value
    taps = sorted({int(k.split(".")[1]) for k in image_state if k.startswith("seg_proj.")})
    acts = set()
    for t in taps:
        ours[f"seg_projectors.{t}.fc.weight"], act = _projection_weight(image_state, f"seg_proj.{t}")
        acts.add(act)
    ours["det_projector.fc.weight"], act = _projection_weight(image_state, "det_proj")
    acts.add(act)
    if len(acts) != 1:
        raise ValueError("AA-CLIP image_adapter mixes projectors with and without LeakyReLU")
    return ours, acts.pop()


def convert(path: str | os.PathLike, **build_options: Any) -> Method:
    """Build `aa-clip` from an official AA-CLIP run folder (or image-adapter file) and load its weights.

    build_options: ``backbone``, ``pretrained``, ``device`` and any `AACLIPConfig` option; defaults are the
    official ViT-L-14-336 / OpenAI / 518. ``projector_act``, ``adapt_text`` and the numbers of adapters
    (``text_adapter_layers``, ``image_adapter_layers``) are read from the files.
    """
    from anomalens.methods import create

    text_path, image_path = locate(path)
    text_state = _read(text_path, "text_adapter") if text_path is not None else None
    state, projector_act = official_to_ours(text_state, _read(image_path, "image_adapter"))
    n_text = sum(k.startswith("text_adapters.") for k in state)
    n_image = sum(k.startswith("image_adapters.") for k in state)
    # The official code only runs ViT-L-14-336, whose depths are the reference depths of the K options.
    options = {
        **OFFICIAL_BUILD,
        "projector_act": projector_act,
        "adapt_text": text_state is not None,
        **({"text_adapter_layers": n_text} if n_text else {}),
        "image_adapter_layers": n_image,
        **build_options,
    }
    backbone, pretrained = options.pop("backbone"), options.pop("pretrained")
    device = options.pop("device", "auto")
    method = create("aa-clip", backbone=backbone, pretrained=pretrained, device=device, **options)
    expected = method.trainable_state()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{image_path}: the AA-CLIP checkpoint does not fit aa-clip on {backbone} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}); "
            "pass the backbone and layer options it was trained with"
        )
    method.load_state_dict(state, strict=False)
    return method.eval()
