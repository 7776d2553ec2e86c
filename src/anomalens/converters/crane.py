"""Official Crane checkpoints (AlirezaSalehy/Crane, ``checkpoints/trained_on_*/epoch_{e}.pth``) → `Crane`.

The official file is ``{"prompt_learner": state_dict}`` (tensors saved on ``cuda:0``). Only three kinds of
its tensors are learned, and they map one to one:

| official key | shape | ours |
| --- | --- | --- |
| ``ctx_pos`` | (1, 1, n_ctx, D) | ``ctx_normal`` (n_ctx, D) |
| ``ctx_neg`` | (1, 1, n_ctx, D) | ``ctx_anomalous`` (n_ctx, D) |
| ``compound_prompts_text.{i}`` | (M, D) | ``deep_prompts.{i}`` (M, D), text layer i + 2 |

The buffers ``token_prefix_*`` / ``token_suffix_*`` are CLIP token embeddings of the fixed prompt words
(we take them from the backbone) and ``tokenized_prompts_*`` their ids, which are checked against ours.
The file does not say whether it is a "Crane" or a "Crane+" checkpoint: pass ``configuration="crane+"``
(or the options) for the latter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from anomalens.methods.base import create
from anomalens.methods.crane import CONFIGURATIONS, Crane


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The prompt-learner state dict of an official checkpoint (``torch.load`` with ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official Crane checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    state = checkpoint.get("prompt_learner", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "ctx_pos" not in state:
        raise ValueError(f"{path}: not an official Crane checkpoint (no 'prompt_learner' with 'ctx_pos')")
    return state


def official_to_crane(state: dict[str, torch.Tensor], method: Crane) -> dict[str, torch.Tensor]:
    """Map an official prompt-learner state onto ``method``'s parameter names, checking every shape.

    Raises:
        ValueError: naming the first tensor that does not fit ``method`` (context length, text width,
            number of deep prompt layers, or prompt words).
    """
    ours = dict(method.named_parameters())
    deep = sorted(
        (k for k in state if k.startswith("compound_prompts_text.")), key=lambda k: int(k.split(".")[-1])
    )
    if len(deep) != len(method.deep_prompts):
        raise ValueError(
            f"checkpoint has {len(deep)} deep prompt layers, the method {len(method.deep_prompts)} "
            f"(deep_prompt_depth={method.config.deep_prompt_depth} on a {method.backbone.text_depth}-layer "
            f"text tower)"
        )
    mapping = {
        "ctx_normal": state["ctx_pos"].reshape(-1, state["ctx_pos"].shape[-1]),
        "ctx_anomalous": state["ctx_neg"].reshape(-1, state["ctx_neg"].shape[-1]),
    }
    mapping.update({f"deep_prompts.{i}": state[k] for i, k in enumerate(deep)})
    for name, tensor in mapping.items():
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise ValueError(
                f"checkpoint tensor for {name!r} has shape {tuple(tensor.shape)}, the method expects "
                f"{tuple(ours[name].shape)} (n_ctx / deep_prompt_length / backbone text width)"
            )
    for key, row in (("tokenized_prompts_pos", 0), ("tokenized_prompts_neg", 1)):
        if key in state and not torch.equal(
            state[key].reshape(-1).long().cpu(), method.prompt_tokens[row].cpu()
        ):
            raise ValueError(f"checkpoint {key!r} are not the token ids of our prompts (other prompt words?)")
    return {k: v.detach().to(torch.float32) for k, v in mapping.items()}


def convert(path: str | os.PathLike, configuration: str | None = None, **build_options: Any) -> Crane:
    """Build `Crane` (``create("crane", **build_options)``) with the prompts of an official checkpoint.

    Args:
        path: official ``epoch_{e}.pth``.
        configuration: "crane" or "crane+" to start from that official configuration (`CONFIGURATIONS`);
            ``build_options`` override it (backbone, pretrained, device, official_compat, ...).
    """
    options: dict[str, Any] = {}
    if configuration is not None:
        if configuration not in CONFIGURATIONS:
            raise ValueError(f"configuration must be one of {sorted(CONFIGURATIONS)}, got {configuration!r}")
        options.update(CONFIGURATIONS[configuration])
    options.update(build_options)
    state = read_official(path)
    method = create("crane", **options)
    mapped = official_to_crane(state, method)
    with torch.no_grad():
        params = dict(method.named_parameters())
        for name, tensor in mapped.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    return method.eval()
