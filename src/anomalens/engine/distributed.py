"""Data-parallel training and sharded evaluation under ``torchrun`` (any number of processes and nodes).

`setup` joins the process group that torchrun describes in the environment (nccl on CUDA, gloo on CPU);
`train_method` calls it itself, so ``torchrun --nproc-per-node 4 -m anomalens.cli train ...`` and a user
script calling ``method.fit`` both work unchanged.

How training is parallelised: every process holds the whole method, reads its own slice of each epoch
through a `DistributedSampler` (``config.batch_size`` is per process, so the global batch is
``batch_size × world_size × grad_accum``), and after the backward passes of each optimiser step the
gradients of the stage's parameters are averaged with one all-reduce (`average_gradients`). This is
what `DistributedDataParallel` computes, without wrapping: a method's trainable parts are scattered over
several submodules and its loss is an arbitrary callable, which DDP's single-``forward`` contract does
not fit, and the trainable parts are small enough that overlapping communication with the backward pass
is not worth the coupling. The learned weights are broadcast from rank 0 when a stage starts, so every
process steps from the same point and stays bitwise identical; learned buffers (e.g. BatchNorm running
statistics, which training-mode forwards do not read) are broadcast from rank 0 at each epoch end, as
DDP's ``broadcast_buffers`` would. Only rank 0 logs, shows progress and writes checkpoints.

Evaluation: each process scores `shard(n)` of the set and `gather_predictions` reassembles the full
`Prediction`, in the original order, on every process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from anomalens.contracts import Prediction


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0)."""
    return rank() == 0


def setup() -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Uses nccl when CUDA is available (and makes ``cuda:LOCAL_RANK`` this process's current device, so
    ``device="auto"`` picks it), gloo otherwise. Does nothing without ``WORLD_SIZE > 1`` in the environment
    or when a group is already initialised. Returns `is_distributed()`.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return is_distributed()


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite `tensors` in place with rank 0's values."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.detach(), src=0)


def average_gradients(params: Sequence[torch.nn.Parameter], flag: bool = False) -> bool:
    """Average the gradients of `params` over all processes with one all-reduce, in place.

    A missing gradient counts as zeros. `flag` rides along in the same all-reduce and the result says
    whether any process raised it (the engine uses it so that a non-finite loss on one process stops all).
    """
    if not is_distributed():
        return flag
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.ones(1, device=grads[0].device) * flag])
    dist.all_reduce(flat)
    raised = bool(flat[-1] > 0)
    flat /= world_size()
    offset = 0
    for p in params:
        chunk = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
    return raised


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over all processes (every process must pass the same keys)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(keys, (t / world_size()).tolist(), strict=True))


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` from every process, in rank order (in memory; nothing is written to disk)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(n: int) -> list[int]:
    """Indices of an n-item evaluation set that this process scores: every world_size-th from its rank."""
    return list(range(rank(), n, world_size()))


def gather_predictions(prediction: Prediction, indices: Sequence[int]) -> Prediction:
    """Reassemble each process's `prediction` of items `indices` (usually `shard(n)`) into one
    `Prediction` of all items in index order, returned on every process."""
    parts = all_gather_objects((list(indices), prediction))
    order = np.array([i for idx, _ in parts for i in idx], dtype=np.int64)
    if len(order) != len(set(order.tolist())) or (len(order) and order.max() != len(order) - 1):
        raise ValueError("gather_predictions: the processes' indices do not partition 0..n-1")
    scores = np.concatenate([p.scores for _, p in parts])
    maps = [m for _, p in parts for m in p.maps]
    perm = np.argsort(order, kind="stable")
    ordered = [maps[i] for i in perm]
    if len({m.shape for m in ordered}) == 1:
        return Prediction(scores[perm], np.stack(ordered))
    return Prediction(scores[perm], ordered)
