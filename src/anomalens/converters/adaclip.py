"""Official AdaCLIP checkpoints (caoyunkang/AdaCLIP, ``weights/pretrained_*.pth``) → `AdaClip`.

The official file is the learned part of ``AdaCLIP_Trainer.state_dict()`` (keys under ``clip_model.``):

| official key | shape | ours |
| --- | --- | --- |
| ``visual_prompter.static_prompts.{j}`` | (n, width) | ``static_visual.{j}`` (image block j + 1) |
| ``text_prompter.static_prompts.{j}``, j ≥ 1 | (n, E) | ``static_text.{j-1}`` (text block j + 1) |
| ``text_prompter.static_prompts.0`` | (n, E) | dropped: the official text layer 1 never reads it |
| ``dynamic_visual_prompt_generator.head.{i}`` | Linear(E, width) × n | ``dynamic_visual`` (E → n·width) |
| ``dynamic_text_prompt_generator.head.{i}`` | Linear(E, E) × n | ``dynamic_text`` (E → n·Dt) |
| ``patch_token_layer.head.{l}`` | Linear(width, E) | ``patch_projections.{l}`` |
| ``cls_token_layer.head.0`` | Linear(E, E) | ``cls_projection`` |

The n generator heads are stacked along the output (head i = rows i·width … (i+1)·width − 1).
The prompt length, depth and type are read from the file; the prompt branch too when static prompts are
present (a dynamic-only file does not say it: pass ``prompt_branch``). The backbone is not recorded: the
official checkpoints are ViT-L-14-336 at 518 px, our defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from anomalens.methods.adaclip import AdaClip
from anomalens.methods.base import create

PREFIX = "clip_model."
VISUAL_STATIC = "visual_prompter.static_prompts."
TEXT_STATIC = "text_prompter.static_prompts."
VISUAL_GENERATOR = "dynamic_visual_prompt_generator.head."
TEXT_GENERATOR = "dynamic_text_prompt_generator.head."


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The learned tensors of an official checkpoint, without the ``clip_model.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official AdaCLIP checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an official AdaCLIP checkpoint (not a state dict)")
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    if "cls_token_layer.head.0.weight" not in state:
        raise ValueError(f"{path}: not an official AdaCLIP checkpoint (no 'clip_model.cls_token_layer')")
    return state


def _indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)})


def official_options(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`AdaClipConfig` options the file determines: prompt_length, prompt_depth, prompt_type (and
    prompt_branch when static prompts are present)."""
    visual, text = _indices(state, VISUAL_STATIC), _indices(state, TEXT_STATIC)
    heads = _indices(state, VISUAL_GENERATOR)
    prompt_type = ("S" if visual or text else "") + ("D" if heads else "")
    if not prompt_type:
        raise ValueError("checkpoint has neither static prompts nor dynamic prompt generators")
    options: dict[str, Any] = {"prompt_type": prompt_type}
    if visual or text:
        options["prompt_branch"] = ("V" if visual else "") + ("L" if text else "")
        options["prompt_depth"] = len(visual or text)
        first = state[f"{VISUAL_STATIC if visual else TEXT_STATIC}0"]
        options["prompt_length"] = int(first.shape[0])
    else:
        options["prompt_length"] = len(heads)
    return options


def official_to_adaclip(state: dict[str, torch.Tensor], method: AdaClip) -> dict[str, torch.Tensor]:
    """Map official tensors onto ``method``'s parameter names, checking every shape.

    Raises:
        ValueError: naming the first tensor that is missing or does not fit ``method``.
    """

    def stacked(prefix: str, part: str) -> torch.Tensor:
        heads = _indices(state, prefix)
        return torch.cat([state[f"{prefix}{i}.{part}"] for i in heads])

    mapping: dict[str, torch.Tensor] = {
        "cls_projection.weight": state["cls_token_layer.head.0.weight"],
        "cls_projection.bias": state["cls_token_layer.head.0.bias"],
    }
    for layer in range(len(method.patch_projections)):
        for part in ("weight", "bias"):
            key = f"patch_token_layer.head.{layer}.{part}"
            if key not in state:
                raise ValueError(f"checkpoint lacks {key!r} (the method scores {len(method.layers)} layers)")
            mapping[f"patch_projections.{layer}.{part}"] = state[key]
    if method.static_visual is not None:
        mapping.update(
            {f"static_visual.{j}": state[f"{VISUAL_STATIC}{j}"] for j in range(len(method.static_visual))}
        )
    if method.static_text is not None:
        mapping.update(
            {f"static_text.{j}": state[f"{TEXT_STATIC}{j + 1}"] for j in range(len(method.static_text))}
        )
    for ours, prefix in (("dynamic_visual", VISUAL_GENERATOR), ("dynamic_text", TEXT_GENERATOR)):
        if getattr(method, ours) is not None:
            mapping[f"{ours}.weight"] = stacked(prefix, "weight")
            mapping[f"{ours}.bias"] = stacked(prefix, "bias")
    params = dict(method.named_parameters())
    unmapped = sorted({n for n in params if not n.startswith("backbone.")} - set(mapping))
    if unmapped:
        raise ValueError(f"checkpoint does not provide {unmapped} (other prompt_type / prompt_branch?)")
    for name, tensor in mapping.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(
                f"checkpoint tensor for {name!r} has shape {tuple(tensor.shape)}, the method expects "
                f"{tuple(params[name].shape)} (backbone widths / prompt_length / prompt_depth)"
            )
    return {k: v.detach().to(torch.float32) for k, v in mapping.items()}


def convert(path: str | os.PathLike, **build_options: Any) -> AdaClip:
    """Build `AdaClip` (``create("adaclip", ...)``) with the learned tensors of an official checkpoint.

    The prompt options read from the file (`official_options`) are applied first; ``build_options``
    (backbone, pretrained, device, image_size, official_compat, ...) override them.
    """
    state = read_official(path)
    method = create("adaclip", **{**official_options(state), **build_options})
    try:
        mapped = official_to_adaclip(state, method)
    except KeyError as e:
        raise ValueError(f"{path}: checkpoint lacks {e.args[0]!r} that the method needs") from None
    with torch.no_grad():
        params = dict(method.named_parameters())
        for name, tensor in mapped.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    return method.eval()
