"""Three Crane optimiser steps against the official ``train.py`` (AlirezaSalehy/Crane), on identical random
tiny weights; skipped unless ``$ANOMALENS_OFFICIAL/Crane`` holds the official tree.

Both sides start from the same learned prompts (random, saved as an official checkpoint and read with our
converter) and take one step on each of the same three batches: the official side with its own
``torch.optim.Adam(prompt_learner.parameters(), lr=1e-3, betas=(0.6, 0.999))`` (train.py:67-68) on the
loss of its training loop (`official_code.crane_official_loss`), ours through the engine's step code with
the ``official`` recipe's settings. The official prompts after the three steps, read back through the
converter, must equal ours to 1e-4. This checks the optimiser, its betas and lr, the absence of weight
decay and of a schedule, and which tensors learn. In float32 both sides agree to about 2e-5 here (Crane
has no batch norm; no learned tensor has a mathematically zero gradient that Adam would blow up).
"""

from __future__ import annotations

import pytest
import torch

import anomalens as al
import official_code
from anomalens.converters.crane import convert
from anomalens.recipes import RECIPES
from helpers import train_steps
from official_code import CRANE_CASES, crane_official_loss, crane_official_model

pytestmark = pytest.mark.skipif(
    not official_code.available("crane"), reason="official Crane code not at $ANOMALENS_OFFICIAL/Crane"
)
TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": 64}


@pytest.fixture(scope="module")
def official():
    with official_code.crane_modules() as mods:
        yield mods


@pytest.mark.parametrize("case", ["crane", "crane+"])
def test_three_steps_match_the_official_train_loop(official, case, tmp_path):
    options, dino_model = CRANE_CASES[case]
    torch.manual_seed(0)
    ours = al.create("crane", official_compat=True, **options, **TINY)
    model, learner, _ = crane_official_model(official, ours, dino_model, train=False)
    with torch.no_grad():
        for p in learner.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    torch.save({"prompt_learner": learner.state_dict()}, tmp_path / "epoch_0.pth")
    ours = convert(tmp_path / "epoch_0.pth", official_compat=True, **options, **TINY)
    initial = {k: v.clone() for k, v in ours.trainable_state().items()}
    batches = []
    for seed in (3, 4, 5):
        ds = al.data.load(f"synthetic:defects?size=64&n=2&seed={seed}", split="test")
        batches.append(ours.collate([ds[i] for i in range(len(ds))], augment=False))

    learner.train_with_img_cls_prob = 1  # train.py's default: image context in every step
    learner.train()
    optimizer = torch.optim.Adam(list(learner.parameters()), lr=1e-3, betas=(0.6, 0.999))
    for b in batches:
        loss = crane_official_loss(official, model, learner, b.images, b.masks, b.labels, ours.layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"prompt_learner": learner.state_dict()}, tmp_path / "epoch_1.pth")
    expected = convert(tmp_path / "epoch_1.pth", official_compat=True, **options, **TINY).trainable_state()

    got = train_steps(ours, "prompts", RECIPES["crane"]["official"].train, batches)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert (value - initial[name]).abs().max() > 2e-3, name  # three steps of ~lr each: it learned
        torch.testing.assert_close(got[name], value, atol=1e-4, rtol=0, msg=name)
