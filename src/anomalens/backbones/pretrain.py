"""Contrastive pre-training of the `anomalens-mini` CLIP on generated image–caption pairs (CPU).

`pretrain_mini` trains the open_clip ``anomalens-mini`` architecture from a seed on the pre-training
classes of `anomalens.data.captions` and writes fp16 safetensors weights (what the package ships as
``resources/anomalens-mini.safetensors``). The loss is CLIP's symmetric InfoNCE with several positives:
a caption matches every image of the batch it describes (same class or a class-agnostic word, same
state; a generic anomalous caption matches every defective image), and each side's target is uniform
over its matches.

Reproducibility: the same seed, steps, batch size, torch version, thread count (`THREADS`) and machine
give bit-identical weights (deterministic algorithms are switched on, data come from seeded numpy
generators); another CPU or thread count may change the float rounding of matrix products.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import text_global_pool

from anomalens.backbones.registry import register_clip_configs
from anomalens.data.captions import CLASSES, Pairs, class_names, sample_pairs

MINI = "anomalens-mini"
PREFETCH = 3  # batches rendered ahead of the training step
THREADS = 1  # fixed: the float rounding of CPU matmuls depends on the thread count
DEFAULTS = {"steps": 500, "batch_size": 128, "lr": 2e-3, "warmup": 40, "weight_decay": 0.1, "seed": 0}


def pretrain_mini(
    out: str | Path,
    *,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    warmup: int = DEFAULTS["warmup"],
    weight_decay: float = DEFAULTS["weight_decay"],
    seed: int = DEFAULTS["seed"],
    save_every: int = 0,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train ``anomalens-mini`` from scratch; write ``out/anomalens-mini.safetensors`` (fp16) and
    ``out/train.json`` (settings, per-step loss, seconds). ``save_every`` > 0 also writes
    ``out/step<k>.safetensors`` every that many steps; ``stop_after`` ends the run after that many steps
    of the ``steps``-step schedule (the weights equal that step's ``save_every`` checkpoint). Returns the
    weights path.

    Runs with `THREADS` torch threads and deterministic algorithms; both settings are restored after.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            run = (steps, batch_size, lr, warmup, weight_decay, seed)
            return _train(Path(out), *run, save_every, stop_after or steps, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    seed: int,
    save_every: int,
    stop_after: int,
    log: Callable[[str], None],
) -> Path:
    from safetensors.torch import save_file

    register_clip_configs()
    out.mkdir(parents=True, exist_ok=True)
    model = open_clip.create_model(MINI)
    model.train()
    tokenizer = open_clip.get_tokenizer(MINI)
    size = model.visual.image_size[0]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    classes = class_names("pretrain")
    history, start = [], time.time()
    # Batches are rendered by one worker process up to `PREFETCH` steps ahead (numpy, deterministic per
    # (seed, step)), so rendering and training overlap on two cores.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pending: deque = deque()
        for step in range(stop_after):
            for ahead in range(step + len(pending), min(stop_after, step + PREFETCH)):
                pending.append(pool.apply_async(sample_pairs, (seed, ahead, batch_size, size, classes)))
            pairs = pending.popleft().get()
            loss = _step(model, optimizer, pairs, tokenizer, learning_rate(step, steps, lr, warmup))
            history.append(round(loss, 5))
            if step % 10 == 0 or step == stop_after - 1:
                log(
                    f"step {step + 1}/{steps} loss {np.mean(history[-10:]):.4f} ({time.time() - start:.0f} s)"
                )
            if save_every and (step + 1) % save_every == 0 and step + 1 < stop_after:
                save_file(half_state(model), str(out / f"step{step + 1}.safetensors"))
    path = out / f"{MINI}.safetensors"
    save_file(half_state(model), str(path))
    settings = {
        "steps": steps,
        "stop_after": stop_after,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
    }
    settings |= {"weight_decay": weight_decay, "seed": seed, "threads": THREADS, "torch": torch.__version__}
    report = {"settings": settings, "classes": classes, "loss": history, "seconds": time.time() - start}
    (out / "train.json").write_text(json.dumps(report, indent=1))
    return path


def _step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, pairs: Pairs, tokenizer, lr: float
) -> float:
    """One optimiser step on a batch at learning rate ``lr``; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = contrastive_loss(model, pairs, tokenizer)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def contrastive_loss(model: torch.nn.Module, pairs: Pairs, tokenizer) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE of a batch (the mean over both directions of the cross-entropy
    between softmax(scale · cos) and the uniform distribution over each row's matches), plus the same
    for the 2 x 2 block of each (normal, defective) pair of `sample_pairs`: normal vs defective given
    their two captions, i.e. the zero-shot decision WinCLIP makes, so the state words get a direct signal."""
    images = to_tensor(pairs.images)  # (N, 3, S, S)
    tokens = tokenizer(pairs.captions)  # (N, 77)
    image_features = F.normalize(model.encode_image(images), dim=-1)  # (N, D)
    text_features = F.normalize(encode_text(model, tokens), dim=-1)  # (N, D)
    logits = model.logit_scale.exp() * image_features @ text_features.T  # (N images, N captions)
    match = torch.from_numpy(pairs.match).float()  # (N, N)
    image_loss = -(F.log_softmax(logits, dim=1) * match / match.sum(1, keepdim=True)).sum(1).mean()
    text_loss = -(F.log_softmax(logits, dim=0) * match / match.sum(0, keepdim=True)).sum(0).mean()
    # The 2 x 2 block of each (normal, defective) pair: the zero-shot decision between its two captions.
    n = logits.shape[0] // 2
    blocks = logits.view(n, 2, n, 2)[torch.arange(n), :, torch.arange(n)]  # (n pairs, 2 images, 2 captions)
    target = torch.arange(2).repeat(n)  # (2n,)
    pair_loss = F.cross_entropy(blocks.reshape(2 * n, 2), target) + F.cross_entropy(
        blocks.transpose(1, 2).reshape(2 * n, 2), target
    )
    return (image_loss + text_loss + pair_loss) / 2


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` on the positions up to the batch's last EOT (exact: causal attention)."""
    keep = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :keep]
    x = model.token_embedding(tokens) + model.positional_embedding[:keep]  # (N, L, Dt)
    x = model.transformer(x, attn_mask=model.attn_mask[:keep, :keep])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type, eos_token_id=model.text_eos_id)
    return x @ model.text_projection  # (N, D)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) → normalised float (N, 3, S, S) with CLIP's (OpenAI) statistics."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    return (x - mean) / std


def half_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in fp16 (contiguous), as shipped: it halves the file (≤ 10 MB)."""
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


__all__ = ["CLASSES", "MINI", "pretrain_mini"]
