"""Training engine: the loop behind `Method.fit` and `anomalens train` (DESIGN.md §5).

`train_method` runs a method's stages with seeded data order, Adam/AdamW/SGD, MultiStep/cosine schedules,
gradient accumulation, AMP on CUDA, tqdm progress, a JSONL log and atomic checkpoints that a later call
with ``resume=True`` continues bit-exactly (on CPU). `distributed` adds torchrun data parallelism and
sharded evaluation.

Layering: the engine imports the training contract (`anomalens.contracts`: `Stage`, `TrainBatch`,
`TrainConfig`) and never `methods/`; it drives a method through ``training_stages()``, ``collate``,
``save`` and its parameters. `Method.fit` imports this package on first use, so loading a model for
inference never loads the training code (STYLE: library separate from training).
"""

from anomalens.engine import distributed
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
    "NonFiniteError",
    "ResumeState",
    "distributed",
    "read_resume",
    "resolve_configs",
    "scheduled_lr",
    "train_method",
    "write_resume",
]
