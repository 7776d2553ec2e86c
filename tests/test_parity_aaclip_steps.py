"""Three AA-CLIP optimiser steps per stage against the official training loops (Mwxinnn/AA-CLIP ``train.py``),
run only when its source tree is at ``$ANOMALENS_OFFICIAL/AA-CLIP`` (never vendored here) and kornia is
importable.

Both sides start from the same random CLIP and adapters (`official_code.aa_clip_training_models`: the official
adapters saved in the official layout and converted; ours under ``official_compat=True``, so stage 1's V-V
reference pass attends over the batch axis as the official one does) and take one step on each of the same
three batches of two images (a normal one, an anomalous one with a mask). The official side runs its own
``train_text_adapter`` / ``train_image_adapter`` with train.py's optimisers (``Adam(text_adapter, lr=1e-5,
betas=(0.5, 0.999))`` without schedule; ``Adam(image_adapter, lr=5e-4, betas=(0.5, 0.999))`` with a
per-iteration ``MultiStepLR``, train.py:263-274); ours runs the engine's own step code (`helpers.train_steps`)
with the ``official`` recipe's settings. Stage 2's milestones are moved from 16k/32k to steps 1 and 2 on both
sides, so that its three steps run at lr, lr/2 and lr/4 and the schedule is checked too. After the three steps
every learned tensor of the stage, read back through the converter's key map, must have moved by more than lr
(it learned) and equal ours to 1e-4 of lr (1e-9 for stage 1, 5e-8 for stage 2).

The official ``AdaptedCLIP`` hard-codes ViT-L's widths and depths (1024 / 768, 24 + 12 blocks); to run in
seconds the visual MLP is shrunk (ratio 0.25), the input is 84 px (6×6 grid) and the text context is 16
tokens instead of 77 (the official ``tokenize`` is called with ``context_length=16``; it raises on a longer
prompt): under the causal text mask the EOT features do not depend on the padding after them, which our
encoder drops anyway.

Both sides run in float64, deliberately. In float32 their gradients agree to about 5e-8 (rounding), but Adam's
first step is lr·g/(|g| + ε) with ε = 1e-8: among the ~10⁶ entries of an adapter a few have |g| ≈ 1e-9, whose
update rounding decides, and they end up to ~lr apart between two equally correct implementations (measured
in stage 2). The official focal loss builds its one-hot targets with ``torch.FloatTensor`` even in a float64
run, which alone shifts gradients by ~2e-9 and, through Adam, parameters by up to ~6e-7; it is given
``DoubleTensor`` while the official loops run. Then gradients agree to ~1e-15 and the parameters after three
steps to 4e-15 (stage 1) and 4e-12 (stage 2), measured; Adam's betas (0.9, 0.999) instead of (0.5, 0.999) move
them by 1.6e-5 (stage 1) and 1.5e-4 (stage 2), a missing schedule (stage 2) by 8e-4.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging

import numpy as np
import pytest
import torch

import official_code
from anomalens.converters.aa_clip import official_to_ours
from anomalens.methods.base import TrainBatch
from anomalens.recipes import RECIPES
from helpers import train_steps

pytestmark = pytest.mark.skipif(
    not official_code.available("aa-clip"), reason=f"official AA-CLIP source not at {official_code.AA_CLIP}"
)

SIZE, CONTEXT = 84, 16
BACKBONE = "aa-clip-parity-small"
CONFIG = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": SIZE, "layers": 24, "width": 1024, "patch_size": 14, "mlp_ratio": 0.25},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
}
CLASS = "bottle"
TEXT_LR, IMAGE_LR, MILESTONES = 1e-5, 5e-4, (1, 2)


@pytest.fixture(scope="module")
def official():
    pytest.importorskip("kornia", reason="the official AA-CLIP code needs kornia")
    with official_code.aa_clip_modules() as mods:
        yield mods


@pytest.fixture(scope="module")
def train_module(official):
    return official_code.aa_clip_train_module()


@pytest.fixture(scope="module")
def models(official, tmp_path_factory):
    """The models of `official_code.aa_clip_training_models` on the small ViT-L-shaped CLIP in float64, with
    the official ``tokenize`` cut to ``CONTEXT`` tokens; also the initial learned state of both sides, which
    each test starts from."""
    import open_clip

    run = tmp_path_factory.mktemp("aa_clip_steps")
    (run / f"{BACKBONE}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(run / f"{BACKBONE}.json")
    surgery, theirs, ours = official_code.aa_clip_training_models(
        official, run, SIZE, torch.float64, BACKBONE, CONFIG
    )
    initial = (
        {k: v.clone() for k, v in theirs.text_adapter.state_dict().items()},
        {k: v.clone() for k, v in theirs.image_adapter.state_dict().items()},
        {k: v.clone() for k, v in ours.trainable_state().items()},  # (a view of the live tensors on a CPU)
    )
    with pytest.MonkeyPatch.context() as patch:
        tokenize = functools.partial(official.forward.tokenize, context_length=CONTEXT)
        patch.setattr(official.forward, "tokenize", tokenize)
        yield surgery, theirs, ours, initial


@contextlib.contextmanager
def _float64_targets():
    """The official focal loss builds its one-hot targets with ``torch.FloatTensor``, the one float32 tensor
    of its float64 run (its 1 − 1e-5 rounded to float32 shifts gradients by ~1e-9); DoubleTensor meanwhile."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "FloatTensor", torch.DoubleTensor)
        yield


def _fresh(models):
    """The models, reset to their initial learned state."""
    surgery, theirs, ours, (text, image, state) = models
    theirs.text_adapter.load_state_dict(text)
    theirs.image_adapter.load_state_dict(image)
    ours.load_state_dict(state, strict=False)
    return surgery, theirs, ours, text, image


def _batches(ours) -> tuple[list[dict], list[TrainBatch]]:
    """Three batches of two random images, a normal one and an anomalous one with a rectangular mask, as the
    official loops (dicts) and our engine (TrainBatch) take them."""
    rng = np.random.default_rng(7)
    official_batches, batches = [], []
    for _ in range(3):
        images = ours.backbone.preprocess(rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)).double()
        masks = torch.zeros(2, SIZE, SIZE, dtype=torch.float64)
        top, left = rng.integers(0, SIZE // 2, 2)
        masks[1, top : top + 20, left : left + 30] = 1.0
        labels = torch.tensor([0, 1])
        official_batches.append(
            {"image": images, "mask": masks[:, None], "label": labels, "class_name": [CLASS] * 2}
        )
        batches.append(TrainBatch(images, masks, labels, torch.ones(2, dtype=torch.bool), [CLASS] * 2))
    return official_batches, batches


def _assert_same_steps(got: dict, expected: dict, start: dict, prefixes: tuple[str, ...], lr: float) -> None:
    """Every official tensor of the stage (names starting with `prefixes`) learned and equals ours."""
    names = [k for k in expected if k.startswith(prefixes)]
    assert names and set(names) <= set(got)
    for name in names:
        assert (expected[name] - start[name]).abs().max() > lr, name  # it learned
        torch.testing.assert_close(got[name], expected[name], atol=lr * 1e-4, rtol=0, msg=name)


def test_three_stage1_steps_match_official_train_text_adapter(train_module, models, tmp_path):
    surgery, theirs, ours, text, image = _fresh(models)
    official_batches, batches = _batches(ours)
    with _float64_targets():
        train_module.train_text_adapter(
            adapted_model=theirs,
            clip_surgery=surgery,
            text_norm_weight=0.1,
            train_loader=official_batches,
            optimizer=torch.optim.Adam(theirs.text_adapter.parameters(), lr=TEXT_LR, betas=(0.5, 0.999)),
            device="cpu",
            start_epoch=0,
            save_path=str(tmp_path),
            text_epoch=1,
            dataset_name="MVTec",
            img_size=SIZE,
            logger=logging.getLogger("aa_clip_official_steps"),
        )
    expected, _ = official_to_ours(theirs.text_adapter.state_dict(), image)
    start, _ = official_to_ours(text, image)
    got = train_steps(ours, "text", RECIPES["aa-clip"]["official"].train, batches)
    _assert_same_steps(got, expected, start, ("text_adapters.", "text_projection."), TEXT_LR)


def test_three_stage2_steps_match_official_train_image_adapter(train_module, models, official, tmp_path):
    _, theirs, ours, text, image = _fresh(models)
    official_batches, batches = _batches(ours)
    with torch.no_grad():
        anchors = {
            CLASS: official.forward.get_adapted_single_class_text_embedding(theirs, "MVTec", CLASS, "cpu")
        }
    optimizer = torch.optim.Adam(theirs.image_adapter.parameters(), lr=IMAGE_LR, betas=(0.5, 0.999))
    with _float64_targets():
        train_module.train_image_adapter(
            model=theirs,
            text_embeddings=anchors,
            train_loader=official_batches,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(MILESTONES), gamma=0.5),
            device="cpu",
            start_epoch=0,
            save_path=str(tmp_path),
            image_epoch=1,
            img_size=SIZE,
            logger=logging.getLogger("aa_clip_official_steps"),
        )
    expected, _ = official_to_ours(text, theirs.image_adapter.state_dict())
    start, _ = official_to_ours(text, image)
    recipe = {**RECIPES["aa-clip"]["official"].train, "image.milestones": MILESTONES}
    got = train_steps(ours, "image", recipe, batches)
    _assert_same_steps(got, expected, start, ("image_adapters.", "seg_", "det_"), IMAGE_LR)
