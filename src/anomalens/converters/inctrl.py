"""Official InCTRL checkpoints (mala-lab/InCTRL ``checkpoint_*.pyth``) → our `inctrl` method.

The official file is ``torch.save(model.state_dict())`` of the whole model (optionally wrapped as
``{"model_state": ...}``): the frozen CLIP (``visual.*``, ``transformer.*``, ...) plus the learned
``adapter.fc.{0,2}.weight`` and the heads ``diff_head_ref`` (η_ref, 640 → 128 → 64 → 1) and ``diff_head``
(η_h, 225 → 128 → 64 → 1). Only the learned parts are taken; the CLIP comes from ``pretrained`` (the
official code trains on ViT-B-16-plus-240 ``laion400m_e32``, which stays frozen). Head keys map as
``projection1/2/3`` → ``linears.0``, ``linears.1``, ``out`` and ``bn2/bn3`` → ``norms.0/1``; ``bn1`` is
unused by the official forward and dropped.

The official residual is prototype − query; ours (paper Eq. 2) is query − prototype. Unless the method
is built with ``official_compat=True``, the first layer of η_ref is negated, which gives identical
outputs: W·(p − q) + b = (−W)·(q − p) + b.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from anomalens.methods.base import Method, create

HEAD_KEYS = {
    "projection1": "linears.0",
    "projection2": "linears.1",
    "projection3": "out",
    "bn2": "norms.0",
    "bn3": "norms.1",
}
HEADS = {"diff_head_ref": "ref_head", "diff_head": "holistic_head"}
BUILD_DEFAULTS = {"backbone": "ViT-B-16-plus-240", "pretrained": "laion400m_e32"}


def map_official_state(state: dict[str, torch.Tensor], negate_residual: bool) -> dict[str, torch.Tensor]:
    """Official learned tensors → our state-dict keys (backbone keys and the unused ``bn1`` dropped).

    negate_residual: negate η_ref's first weight, turning the official prototype − query residual into
    our query − prototype one.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "adapter":
            out[key] = value
        elif head in HEADS:
            module, _, param = rest.partition(".")
            if module in HEAD_KEYS:
                out[f"{HEADS[head]}.{HEAD_KEYS[module]}.{param}"] = value
    first = "ref_head.linears.0.weight"
    if negate_residual and first in out:
        out[first] = -out[first]
    return out


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The official state dict from ``path`` (``weights_only=True``; ``{"model_state": ...}`` unwrapped)."""
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state" in state:
        state = state["model_state"]
    if not isinstance(state, dict) or not any(k.startswith("diff_head_ref.") for k in state):
        raise ValueError(f"{path}: not an official InCTRL checkpoint (no 'diff_head_ref.*' tensors)")
    return state


def convert(path: str | os.PathLike, **build_options: Any) -> Method:
    """Build `inctrl` from the official checkpoint at ``path``.

    build_options go to `anomalens.create` (default ``backbone="ViT-B-16-plus-240"``,
    ``pretrained="laion400m_e32"``); ``official_compat=True`` keeps the official residual sign and its
    batch regrouping. Raises ValueError when the checkpoint's tensors do not fit the built model (e.g.
    η_h's 225 inputs need the 15×15 patch grid of ViT-B-16-plus-240 at 240 px).
    """
    state = read_official(path)
    method = create("inctrl", **{**BUILD_DEFAULTS, **build_options})
    mapped = map_official_state(state, negate_residual=not method.config.official_compat)
    own = method.trainable_state()
    missing = sorted(set(own) - set(mapped))
    wrong = [k for k in mapped if k in own and mapped[k].shape != own[k].shape]
    if missing or wrong:
        detail = ", ".join(f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3])
        raise ValueError(
            f"{path}: does not fit inctrl on {method.backbone.name} at {method.backbone.image_size}px "
            f"(missing {missing[:3]}; shape mismatches: {detail or 'none'})"
        )
    method.load_state_dict({k: v.to(method.device) for k, v in mapped.items()}, strict=False)
    return method.eval()
