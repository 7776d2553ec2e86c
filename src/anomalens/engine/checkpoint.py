"""Resume state on disk: one safetensors file, written atomically, with no pickle anywhere.

``resume.safetensors`` holds everything needed to continue a run exactly where its last completed epoch
ended. Tensors: the learned weights (``model.<name>``, the same tensors `Method.save` writes), the
optimiser's per-parameter state (``optim.<index>.<name>``) and each process's RNG states as uint8
tensors (``rng.<rank>.torch|cuda|numpy|python``). The JSON metadata (key ``"anomalens_resume"``) holds
the position (stage, stage index, completed epochs, optimiser steps), the optimiser's param groups and
non-tensor state, the AMP grad-scaler state, the scalar parts of the RNG states, the history so far and
the method's identity (name, backbone, options) so a mismatched resume fails clearly.

The weights are stored here as well as in ``model.anomalens`` so that this file alone is a consistent
snapshot: the two files are replaced one after the other, and an interruption between the two
replacements must not pair new weights with an old optimiser state.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from anomalens.files import atomic_path

RESUME_FORMAT = 1
_META_KEY = "anomalens_resume"

RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write a safetensors file atomically and flushed to disk (`files.atomic_path`).

    Readers see either the previous file or the complete new one; a failure part-way leaves the previous
    file untouched and removes the temporary file.
    """
    with atomic_path(path, fsync=True) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    return Path(path)


# ---------------------------------------------------------------------- optimiser state
def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (``optim.<index>.<name>``) and JSON-able metadata."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]
    ]
    return tensors, {"param_groups": groups, "values": values}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer_state`: a dict for `optimizer.load_state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["values"].items():
        state.setdefault(int(index), {}).update(entries)
    # JSON turned tuples (Adam's betas) into lists; torch keeps them as tuples.
    groups = [
        {k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- RNG state
def _as_uint8(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy())


def capture_rng(device: torch.device) -> RngState:
    """This process's python, numpy, torch (and CUDA, when training there) RNG states."""
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy": _as_uint8(np.asarray(np_keys, dtype=np.uint32)),
        "python": _as_uint8(np.asarray(py_internal, dtype=np.uint32)),
    }
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    meta = {
        "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_cached)],
        "python": [py_version, py_gauss],
    }
    return tensors, meta


def restore_rng(state: RngState, device: torch.device) -> None:
    """Put back the RNG states returned by `capture_rng`."""
    tensors, meta = state
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"], device)
    np_kind, np_pos, np_has_gauss, np_cached = meta["numpy"]
    np.random.set_state((np_kind, tensors["numpy"].numpy().view(np.uint32), np_pos, np_has_gauss, np_cached))
    py_version, py_gauss = meta["python"]
    internal = tuple(int(x) for x in tensors["python"].numpy().view(np.uint32))
    random.setstate((py_version, internal, py_gauss))


# ---------------------------------------------------------------------- the resume file
@dataclass
class ResumeState:
    """Where a run stood at the end of its last completed epoch, and everything needed to go on."""

    stage: str  # name of the stage being trained
    stage_index: int  # its index in `method.training_stages()`
    epoch: int  # epochs of `stage` completed
    step: int  # optimiser steps of `stage` completed
    identity: dict[str, Any]  # method, backbone, options of the trained method
    model: dict[str, torch.Tensor]  # `method.trainable_state()`
    optimizer: dict[str, Any]  # `optimizer.state_dict()`
    scaler: dict[str, Any]  # `GradScaler.state_dict()` ({} when AMP fp16 is off)
    rng: dict[int, RngState]  # per process rank
    history: dict[str, list[dict[str, float]]]
    seed: int
    world_size: int = 1


def write_resume(path: str | os.PathLike, state: ResumeState) -> Path:
    """Write `state` atomically (see `atomic_save_safetensors`)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state.model.items()}
    optim_tensors, optim_meta = flatten_optimizer_state(state.optimizer)
    tensors.update(optim_tensors)
    rng_meta = {}
    for rank, (rng_tensors, meta) in state.rng.items():
        tensors.update({f"rng.{rank}.{k}": v for k, v in rng_tensors.items()})
        rng_meta[str(rank)] = meta
    meta = {
        "format": RESUME_FORMAT,
        "stage": state.stage,
        "stage_index": state.stage_index,
        "epoch": state.epoch,
        "step": state.step,
        "identity": state.identity,
        "optimizer": optim_meta,
        "scaler": state.scaler,
        "rng": rng_meta,
        "history": state.history,
        "seed": state.seed,
        "world_size": state.world_size,
    }
    return atomic_save_safetensors(path, tensors, {_META_KEY: json.dumps(meta)})


def read_resume(path: str | os.PathLike) -> ResumeState:
    """Read a file written by `write_resume`; errors name the file."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta_text = (f.metadata() or {}).get(_META_KEY)
            names = f.keys()
            tensors = {k: f.get_tensor(k) for k in names}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path}: not a readable resume file ({e})") from None
    if meta_text is None:
        raise ValueError(f"{path}: not an anomalens resume file (no {_META_KEY!r} metadata)")
    meta = json.loads(meta_text)
    if meta.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path}: resume format {meta.get('format')!r}, this version reads {RESUME_FORMAT}")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}}
    rng_tensors: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "rng":
            rank, name = rest.split(".", 1)
            rng_tensors.setdefault(int(rank), {})[name] = value
        else:
            groups[kind][rest if kind == "model" else key] = value
    return ResumeState(
        stage=meta["stage"],
        stage_index=meta["stage_index"],
        epoch=meta["epoch"],
        step=meta["step"],
        identity=meta["identity"],
        model=groups["model"],
        optimizer=unflatten_optimizer_state(groups["optim"], meta["optimizer"]),
        scaler=meta["scaler"],
        rng={int(r): (rng_tensors[int(r)], m) for r, m in meta["rng"].items()},
        history=meta["history"],
        seed=meta["seed"],
        world_size=meta["world_size"],
    )
