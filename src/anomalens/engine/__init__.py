"""Training engine: the loop behind `Method.fit` and `anomalens train` (DESIGN.md §5).

`train_method` runs a method's stages with seeded data order, Adam/AdamW/SGD, MultiStep/cosine schedules,
gradient accumulation, AMP on CUDA, tqdm progress, a JSONL log and atomic checkpoints that a later call
with ``resume=True`` continues bit-exactly (on CPU). `distributed` adds torchrun data parallelism and
sharded evaluation; `FeatureCache` is an optional memory-mapped store of frozen-backbone features.
Nothing in `methods/` or `backbones/` imports this package (STYLE: library separate from training).
"""

from anomalens.engine import distributed
from anomalens.engine.cache import FeatureCache, FeatureKey
from anomalens.engine.checkpoint import ResumeState, read_resume, write_resume
from anomalens.engine.trainer import (
    LOG_FILE,
    MODEL_FILE,
    RESUME_FILE,
    NonFiniteError,
    resolve_configs,
    scheduled_lr,
    train_method,
)

__all__ = [
    "LOG_FILE",
    "MODEL_FILE",
    "RESUME_FILE",
    "FeatureCache",
    "FeatureKey",
    "NonFiniteError",
    "ResumeState",
    "distributed",
    "read_resume",
    "resolve_configs",
    "scheduled_lr",
    "train_method",
    "write_resume",
]
