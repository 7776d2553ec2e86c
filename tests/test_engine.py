"""Training engine: learning, options, schedules, accumulation, resume, atomic files, logs, cache, DDP.

Everything runs on a self-contained toy method (a frozen fake backbone computing per-channel means and
maxima of 8×8 images, a small learnable MLP on top) so these tests do not depend on the real backbones.
The toy is not registered as a method.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from anomalens.data.types import Dataset, Record, Sample
from anomalens.engine import (
    LOG_FILE,
    MODEL_FILE,
    RESUME_FILE,
    NonFiniteError,
    distributed,
    read_resume,
    resolve_configs,
    scheduled_lr,
    train_method,
)
from anomalens.methods.base import (
    BatchPrediction,
    Method,
    Prediction,
    Stage,
    TrainBatch,
    TrainConfig,
    read_checkpoint,
)

SIZE = 8


# ---------------------------------------------------------------------- toy data and method
def _load_toy(record: Record) -> Sample:
    """Image i: dark noise; odd i are anomalous with a saturated 2×2 square (its mask)."""
    rng = np.random.default_rng(int(Path(record.path).stem))
    image = rng.integers(0, 120, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = None
    if record.label:
        y, x = rng.integers(0, SIZE - 2, 2)
        image[y : y + 2, x : x + 2] = 255
        mask = image.min(-1) == 255
    return Sample(image, mask, record.label, record.class_name, record.path)


def toy_dataset(n: int = 32) -> Dataset:
    return Dataset("toy", [Record(f"toy/{i}.png", i % 2, "toy") for i in range(n)], _load_toy)


class ToyBackbone(nn.Module):
    """Frozen 'backbone': (B,3,S,S) → per-channel mean and max (B,6)."""

    name = "toy"
    pretrained = None

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3), requires_grad=False)

    def preprocess(self, arrays: list[np.ndarray], resize: str = "squash") -> torch.Tensor:
        return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255 for a in arrays])

    def preprocess_masks(self, masks: list[np.ndarray], resize: str = "squash") -> torch.Tensor:
        return torch.stack([torch.from_numpy(m).float() for m in masks])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.scale[:, None, None]
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)


@dataclass(frozen=True)
class ToyConfig:
    hidden: int = 8  # 0: a single linear layer (one stage)
    dropout: float = 0.0
    head_normals_only: bool = False


@dataclass(frozen=True)
class ToySchedule:
    body: TrainConfig = TrainConfig(epochs=1, batch_size=8, lr=0.05)
    head: TrainConfig = TrainConfig(epochs=1, batch_size=8, lr=0.05)


class ToyMethod(Method):
    """Stages "body" (MLP hidden layer, when hidden > 0) then "head" (final linear layer)."""

    name = "toy"
    config_class = ToyConfig
    schedule_class = ToySchedule

    def __init__(self, config: ToyConfig, backbone: nn.Module):
        super().__init__(config, backbone)
        width = config.hidden or 6
        self.body = (
            nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Dropout(config.dropout))
            if config.hidden
            else nn.Identity()
        )
        self.head = nn.Linear(width, 1)
        self.loss_hook = None  # test hook: called with the loss, may replace it or raise
        self.seen: list[tuple[list[str], list[int]]] = []

    def train(self, mode: bool = True) -> ToyMethod:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward_batch(self, images, class_names, support):
        scores = torch.sigmoid(self.head(self.body(self.backbone(images)))[:, 0])
        return BatchPrediction(scores, torch.zeros(len(images), SIZE, SIZE))

    def collate(self, samples: list[Sample], augment: bool) -> TrainBatch:
        batch = super().collate(samples, augment)
        if augment:
            batch.images = batch.images + 0.05 * torch.randn_like(batch.images)
        batch.class_names = [f"{name}@{os.getpid()}" for name in batch.class_names]
        return batch

    def loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        self.seen.append((batch.class_names, batch.labels.tolist()))
        logits = self.head(self.body(self.backbone(batch.images)))[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels.float())
        if self.loss_hook is not None:
            loss = self.loss_hook(loss)
        return {"loss": loss, "acc": ((logits > 0) == batch.labels.bool()).float().mean()}

    def training_stages(self) -> list[Stage]:
        stages = []
        if self.config.hidden:
            stages.append(Stage("body", self.body.parameters, self.loss, self.schedule.body))
        select = _normals if self.config.head_normals_only else None
        stages.append(Stage("head", self.head.parameters, self.loss, self.schedule.head, select=select))
        return stages


def _normals(dataset: Dataset) -> Dataset:
    return dataset.subset([i for i, r in enumerate(dataset.records) if r.label == 0])


def make(seed: int = 0, **options) -> ToyMethod:
    torch.manual_seed(seed)
    return ToyMethod(ToyConfig(**options), ToyBackbone())


def train(method: ToyMethod, dataset: Dataset | None = None, **options) -> dict:
    return train_method(method, dataset or toy_dataset(), progress=False, **options)


def weights(method: Method) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.trainable_state().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def call_counter(action):
    """A loss hook that calls action(n, loss) on the n-th call (1-based) and returns its result."""
    calls = [0]

    def hook(loss):
        calls[0] += 1
        return action(calls[0], loss)

    return hook


# ---------------------------------------------------------------------- learning and options
def test_loss_decreases_and_method_ends_in_eval():
    method = make()
    history = train(method, epochs=8, lr=0.1)
    body, head = history["body"], history["head"]
    assert [h["epoch"] for h in body] == list(range(1, 9)) and len(head) == 8
    losses = [h["loss"] for h in body + head]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.3 * losses[0]
    assert head[-1]["acc"] > 0.9
    assert not method.training and not method.backbone.training
    assert all(p.requires_grad for p in method.body.parameters())  # paused only during "head"
    assert all(p.grad is None for p in method.parameters())  # so "head" accumulated none into "body"
    assert torch.equal(method.backbone.scale, torch.ones(3))
    scores = method.predict(np.stack([toy_dataset()[i].image for i in range(8)])).scores
    assert (scores[1::2] > scores[0::2]).all()


def test_overrides_global_and_per_stage():
    history = train(make(), epochs=2, **{"head.epochs": 3, "head.max_steps_per_epoch": 1})
    assert len(history["body"]) == 2 and [h["steps"] for h in history["body"]] == [4, 4]
    assert len(history["head"]) == 3 and [h["steps"] for h in history["head"]] == [1, 1, 1]

    stages = make().training_stages()
    configs = resolve_configs(stages, {"lr": 1, "milestones": [3, 1], "body.lr": 0.5, "betas": [0.5, 0.9]})
    assert configs["head"].lr == 1.0 and isinstance(configs["head"].lr, float)
    assert configs["body"].lr == 0.5 and configs["head"].milestones == (3, 1)
    assert configs["body"].betas == (0.5, 0.9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nope": 1}, "unknown training option 'nope'"),
        ({"head.nope": 1}, "unknown training option 'head.nope'"),
        ({"zzz.epochs": 1}, "no stage 'zzz'"),
        ({"optimizer": "rmsprop"}, "stage 'body': optimizer 'rmsprop'"),
        ({"head.grad_accum": 0}, "stage 'head': grad_accum must be >= 1"),
        ({"stages": ["zzz"]}, "unknown stage"),
        ({"resume": True}, "needs out_dir"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        train(make(), **options)


def test_stage_select_and_stage_subset():
    method = make(head_normals_only=True)
    history = train(method, stages=["head"])
    assert list(history) == ["head"] and history["head"][0]["steps"] == 2  # 16 normals / batch 8
    assert {label for _, labels in method.seen for label in labels} == {0}


def test_schedules_match_torch_per_iteration():
    config = TrainConfig(lr=1.0, schedule="multistep", milestones=(5, 2), gamma=0.1)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    multistep = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 5], gamma=0.1)
    for step in range(8):
        assert math.isclose(scheduled_lr(config, step, 8), optimizer.param_groups[0]["lr"], rel_tol=1e-12)
        optimizer.step()
        multistep.step()
    assert [scheduled_lr(config, s, 8) for s in (0, 1, 2, 4, 5, 7)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )

    config = TrainConfig(lr=2.0, schedule="cosine")
    optimizer = torch.optim.SGD([param], lr=2.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for step in range(11):
        assert scheduled_lr(config, step, 10) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        cosine.step()
    assert scheduled_lr(TrainConfig(lr=0.3), 99, 10) == 0.3


def test_multistep_in_training_and_jsonl_log(tmp_path):
    train(
        make(),
        stages=["head"],
        epochs=2,
        lr=1.0,
        optimizer="sgd",
        schedule="multistep",
        milestones=(2, 5),
        gamma=0.1,
        out_dir=tmp_path,
        log_every=1,
    )
    train(make(), stages=["head"], epochs=2, out_dir=tmp_path / "every3", log_every=3)
    lines = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    steps = [r for r in lines if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["lr"] for r in steps] == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    assert [r["epoch"] for r in steps] == [1] * 4 + [2] * 4
    for r in steps:
        assert {"stage", "loss", "acc", "lr", "seconds"} <= r.keys() and r["stage"] == "head"
    epochs = [r for r in lines if r["event"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 4), (2, 8)]
    assert lines[0]["event"] == "start" and lines[0]["configs"]["head"]["milestones"] == [2, 5]

    lines = [json.loads(line) for line in (tmp_path / "every3" / LOG_FILE).read_text().splitlines()]
    assert [(r["event"], r.get("step")) for r in lines] == [
        ("start", None), ("step", 3), ("epoch", 4), ("step", 6), ("epoch", 8),
    ]  # fmt: skip
    assert all(math.isfinite(r["loss"]) and r["seconds"] >= 0 for r in lines[1:])


@pytest.mark.parametrize(("n", "big", "micro", "accum"), [(16, 8, 4, 2), (24, 16, 4, 4)])
def test_grad_accumulation_equals_bigger_batch(n, big, micro, accum):
    """24 samples, micro-batches of 4, accum 4: the second step averages only 2 micro-batches, like a
    last batch of 8."""
    dataset = toy_dataset(n)
    common = {"epochs": 2, "optimizer": "sgd", "lr": 0.5}
    a, b = make(hidden=0), make(hidden=0)
    ha = train(a, dataset, batch_size=big, **common)
    hb = train(b, dataset, batch_size=micro, grad_accum=accum, **common)
    assert [h["steps"] for h in ha["head"]] == [h["steps"] for h in hb["head"]]
    for k, v in weights(a).items():
        assert (v - weights(b)[k]).abs().max() < 1e-6, k
    assert not torch.equal(weights(a)["head.weight"], weights(make(hidden=0))["head.weight"])


# ---------------------------------------------------------------------- resume and checkpoints
RESUME_OPTIONS = {
    "optimizer": "adam",
    "schedule": "multistep",
    "milestones": (3,),
    "augment": True,
    "lr": 0.05,
}


def _reference(stages=("body", "head"), epochs=2) -> tuple[dict[str, torch.Tensor], dict]:
    method = make(dropout=0.2)
    history = train(method, stages=list(stages), epochs=epochs, **RESUME_OPTIONS)
    return weights(method), history


def _without_seconds(history: dict) -> dict:
    return {s: [{k: v for k, v in h.items() if k != "seconds"} for h in hs] for s, hs in history.items()}


def test_resume_after_fewer_epochs_is_bit_exact(tmp_path):
    reference, ref_history = _reference(stages=("head",))
    first = make(dropout=0.2)
    train(first, stages=["head"], epochs=1, out_dir=tmp_path, **RESUME_OPTIONS)
    assert not torch.equal(weights(first)["head.weight"], reference["head.weight"])

    fresh = make(seed=123, dropout=0.2)  # another initialisation: everything must come from the files
    history = train(fresh, stages=["head"], epochs=2, out_dir=tmp_path, resume=True, **RESUME_OPTIONS)
    assert_bitwise_equal(weights(fresh), reference)
    assert _without_seconds(history) == _without_seconds(ref_history)
    assert_bitwise_equal(read_checkpoint(tmp_path / MODEL_FILE)[1], reference)


class Interrupted(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("interrupt_at", [7, 15])  # in body's 2nd epoch; in head's 2nd epoch (of 4 steps)
def test_resume_after_interrupt_is_bit_exact(tmp_path, interrupt_at):
    reference, ref_history = _reference()

    def interrupt(n, loss):
        if n == interrupt_at:
            raise Interrupted
        return loss

    method = make(dropout=0.2)
    method.loss_hook = call_counter(interrupt)
    with pytest.raises(Interrupted):
        train(method, epochs=2, out_dir=tmp_path, **RESUME_OPTIONS)
    assert not method.training  # left in eval even when interrupted
    saved = read_resume(tmp_path / RESUME_FILE)
    assert (saved.stage, saved.epoch, saved.step) == (("body", 1, 4) if interrupt_at == 7 else ("head", 1, 4))

    fresh = make(seed=7, dropout=0.2)
    history = train(fresh, epochs=2, out_dir=tmp_path, resume=True, **RESUME_OPTIONS)
    assert_bitwise_equal(weights(fresh), reference)
    assert _without_seconds(history) == _without_seconds(ref_history)


@pytest.mark.parametrize("failing", [MODEL_FILE, RESUME_FILE])
def test_failed_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch, failing):
    reference, _ = _reference(stages=("head",))
    train(make(dropout=0.2), stages=["head"], epochs=1, out_dir=tmp_path, **RESUME_OPTIONS)
    before = (tmp_path / failing).read_bytes()
    real_save = safetensors.torch.save_file

    def save_then_fail(tensors, filename, metadata=None):
        if Path(filename).name.startswith(f".{failing}."):
            Path(filename).write_bytes(b"half a file")
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        train(make(dropout=0.2), stages=["head"], epochs=2, out_dir=tmp_path, resume=True, **RESUME_OPTIONS)
    assert (tmp_path / failing).read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert read_resume(tmp_path / RESUME_FILE).epoch == 1
    monkeypatch.undo()

    fresh = make(seed=5, dropout=0.2)
    train(fresh, stages=["head"], epochs=2, out_dir=tmp_path, resume=True, **RESUME_OPTIONS)
    assert_bitwise_equal(weights(fresh), reference)


def test_non_finite_loss_names_the_step_and_keeps_last_checkpoint(tmp_path):
    saved: dict[str, bytes] = {}

    def poison(n, loss):
        if n == 5:  # first step of epoch 2: epoch 1's checkpoint is on disk
            saved.update({f: (tmp_path / f).read_bytes() for f in (MODEL_FILE, RESUME_FILE)})
        return loss * float("nan") if n == 6 else loss

    method = make()
    method.loss_hook = call_counter(poison)
    with pytest.raises(
        NonFiniteError, match=r"stage 'head', epoch 2, step 6: non-finite loss.*nothing in .* was overwritten"
    ):
        train(method, stages=["head"], epochs=3, out_dir=tmp_path)
    assert all((tmp_path / f).read_bytes() == data for f, data in saved.items())
    assert read_resume(tmp_path / RESUME_FILE).epoch == 1
    assert all(torch.isfinite(v).all() for v in method.trainable_state().values())  # not stepped with NaN


def test_resume_checks_identity_and_missing_file(tmp_path):
    with pytest.warns(UserWarning, match="does not exist yet"):
        train(make(), stages=["head"], out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="written by"):
        train(make(hidden=4), stages=["head"], out_dir=tmp_path, resume=True)


def test_collate_runs_in_workers_with_identical_results():
    a, b = make(), make()
    train(a, stages=["head"], epochs=2)
    train(b, stages=["head"], epochs=2, num_workers=2)
    assert_bitwise_equal(weights(a), weights(b))
    pids = {name.rsplit("@", 1)[1] for names, _ in b.seen for name in names}
    assert str(os.getpid()) not in pids and len(pids) >= 1


# ---------------------------------------------------------------------- distributed (gloo, 2 processes)
DDP_OPTIONS = {"epochs": 2, "lr": 0.05, "optimizer": "adam", "stages": ["head"]}


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    try:
        assert distributed.setup() and distributed.rank() == rank and distributed.world_size() == world
        method = make(seed=rank, hidden=0)  # different initialisations: rank 0's is broadcast
        train(method, batch_size=4, out_dir=out_dir, **DDP_OPTIONS)
        safetensors.torch.save_file(method.trainable_state(), f"{out_dir}/rank{rank}.safetensors")

        indices = distributed.shard(5)
        maps = [np.full((2 + i % 2, 3), i, np.float32) for i in indices]
        full = distributed.gather_predictions(Prediction(np.array(indices, np.float32), maps), indices)
        assert full.scores.tolist() == [0, 1, 2, 3, 4]
        assert [m.shape for m in full.maps] == [(2, 3), (3, 3), (2, 3), (3, 3), (2, 3)]
        assert [float(m[0, 0]) for m in full.maps] == [0, 1, 2, 3, 4]
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_matches_single_process(tmp_path):
    """Ranks end bitwise identical; they equal one process on the same global batch (2 × 4) to 1e-6."""
    context = mp.start_processes(
        _ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers did not finish in 120 s")
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert_bitwise_equal(rank0, rank1)

    single = make(seed=0, hidden=0)
    train(single, batch_size=8, **DDP_OPTIONS)
    for k, v in weights(single).items():
        assert (v - rank0[k]).abs().max() < 1e-6, k
    assert not torch.equal(rank0["head.weight"], weights(make(seed=0, hidden=0))["head.weight"])
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["event"] for r in log].count("start") == 1 and log[0]["world_size"] == 2  # rank 0 only
    assert read_resume(tmp_path / RESUME_FILE).rng.keys() == {0, 1}


# ---------------------------------------------------------------------- precision, sampler, progress
def test_amp_is_opt_in():
    """All four official sources train in fp32: AMP is off unless asked for."""
    assert TrainConfig().amp is False
    assert all(not s.config.amp for s in make().training_stages())


def _imbalanced(n: int = 32) -> Dataset:
    """One anomalous image in four (label of image i: i % 4 == 3)."""
    return Dataset("toy", [Record(f"toy/{i}.png", int(i % 4 == 3), "toy") for i in range(n)], _load_toy)


def test_balanced_sampler_gives_half_normal_half_anomalous_and_fixed_steps():
    m = make(hidden=0)
    history = train(m, _imbalanced(), sampler="balanced", batch_size=8, max_steps_per_epoch=5, epochs=3)
    assert [h["steps"] for h in history["head"]] == [5, 5, 5]
    assert len(m.seen) == 15
    assert all(labels == [0] * 4 + [1] * 4 for _, labels in m.seen)


def test_balanced_sampler_uses_every_image_of_a_label_before_repeating():
    from anomalens.engine.sampling import BalancedBatchSampler

    labels = [int(i % 4 == 3) for i in range(32)]  # 24 normal, 8 anomalous
    sampler = BalancedBatchSampler(labels, batch_size=8, steps=3, seed=0)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append([i for batch in sampler for i in batch])
    normals = [i for e in epochs for i in e if not labels[i]]  # 2 epochs × 12 = 24: one full cycle
    anomalous = [i for e in epochs for i in e if labels[i]]  # 24 = three cycles of 8
    assert sorted(normals) == [i for i in range(32) if not labels[i]]
    for cycle in range(3):
        assert sorted(anomalous[8 * cycle : 8 * cycle + 8]) == [i for i in range(32) if labels[i]]
    sampler.set_epoch(1)  # an epoch's batches depend on (seed, epoch) only, as after a resume
    assert [i for batch in sampler for i in batch] == epochs[1]


def test_balanced_sampler_needs_both_labels():
    with pytest.raises(ValueError, match="no anomalous image"):
        train(make(hidden=0), _normals(toy_dataset()), sampler="balanced")
    with pytest.raises(ValueError, match="sampler 'random' is not one of"):
        train(make(hidden=0), sampler="random")


def test_losses_of_stages_that_ask_get_the_training_progress():
    m = make(hidden=0)
    seen = []

    def loss(batch, progress):
        seen.append(progress)
        return m.loss(batch)

    stage = Stage("head", m.head.parameters, loss, TrainConfig(epochs=2, batch_size=8), needs_progress=True)
    m.training_stages = lambda: [stage]
    train(m, toy_dataset(24))
    assert [(p.stage, p.epoch, p.epochs, p.step, p.total_steps) for p in seen] == [
        ("head", e, 2, s, 6) for e, s in ((0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5))
    ]
    assert seen[3].fraction == 0.5


def test_stages_get_the_support_data():
    m = make(hidden=0)
    given = []
    stage = Stage("head", m.head.parameters, m.loss, TrainConfig(batch_size=8), support=given.append)
    m.training_stages = lambda: [stage]
    pool = toy_dataset(4)
    train(m, toy_dataset(8), support_data=pool)
    train(m, toy_dataset(8))
    assert given[0] is pool and len(given[1]) == 8
