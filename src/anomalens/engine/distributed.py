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

Evaluation (`anomalens eval`/`detect` under torchrun): each process scores `shard(n, batch_size)` of
a set, whole batches of it, and `gather_predictions` / `gather_items` reassemble the full `Prediction`
and the per-item values in the original order on every process, so the results equal one process's.
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


def shard(n: int, batch_size: int = 1) -> list[int]:
    """Indices of an n-item evaluation set that this process scores: of the set's consecutive batches of
    `batch_size` items, every world_size-th from its rank. Each batch is then the batch one process
    forms, so per-item results are those of one process bit for bit (a batched matmul's rounding may
    depend on what else is in the batch)."""
    starts = range(rank() * batch_size, n, world_size() * batch_size)
    return [i for start in starts for i in range(start, min(start + batch_size, n))]


def gather_predictions(prediction: Prediction | None, indices: Sequence[int]) -> Prediction:
    """Reassemble each process's `prediction` of items `indices` (usually `shard(n, batch_size)`; None
    for a process with no items) into one `Prediction` of all items in index order, extras included,
    returned on every process."""
    parts = all_gather_objects((list(indices), prediction))
    order = _partition([i for idx, _ in parts for i in idx])
    whole = Prediction.concat([p for idx, p in parts if idx])
    maps = [whole.maps[i] for i in order]
    stacked = np.stack(maps) if len({m.shape for m in maps}) == 1 else maps
    return Prediction(whole.scores[order], stacked, {k: v[order] for k, v in whole.extras.items()})


def gather_items(items: Sequence[Any], indices: Sequence[int]) -> list[Any]:
    """Like `gather_predictions` for any picklable per-item values (e.g. masks): all items in index
    order, on every process."""
    parts = all_gather_objects((list(indices), list(items)))
    flat = [item for _, part in parts for item in part]
    return [flat[i] for i in _partition([i for idx, _ in parts for i in idx])]


def _partition(order: list[int]) -> np.ndarray:
    """The permutation that sorts the gathered `order`; an error unless it is exactly 0..n-1."""
    if sorted(order) != list(range(len(order))):
        raise ValueError("gather: the processes' indices do not partition 0..n-1")
    return np.argsort(np.array(order, dtype=np.int64), kind="stable")
