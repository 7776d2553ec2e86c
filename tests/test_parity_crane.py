"""Parity with the official Crane code (AlirezaSalehy/Crane), on identical random tiny weights.

Skipped unless ``$ANOMALENS_OFFICIAL/Crane`` holds a checkout of the official repository (never copied
into this tree). The official model is built from its own classes with the test-tiny dimensions and our
backbone's weights; its prompt learner is saved as an official checkpoint and read back with our
converter; then scores, smoothed maps, the training loss and its gradients must agree to 1e-4 with
``official_compat=True``.

Adaptations of the official model, all outside its code: its hard-coded QuickGELU is swapped for the
exact GELU test-tiny uses; its visual tower is rebuilt with test-tiny's 4 heads (it derives width // 64);
``torch.hub``'s DINOv2 is replaced by the same timm test-tiny-dino our method uses, behind the hub
model's ``get_intermediate_layers(x, reshape=True)`` call; missing optional imports of its package
(``pkg_resources``, ``humanhash``) are stubbed. The inference and loss glue (`official_code`, shared
with benchmarks/bench_official.py) follows its ``test.py`` (``ScoreCalculator.forward``) and
``train.py`` (training step) using its own functions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomalens as al
import official_code
from anomalens.converters.crane import convert
from official_code import CRANE_CASES as CASES
from official_code import (
    crane_official_loss,
    crane_official_model,
    crane_official_predict,
    crane_official_text,
)

pytestmark = pytest.mark.skipif(
    not official_code.available("crane"), reason="official Crane code not at $ANOMALENS_OFFICIAL/Crane"
)

SIZE = 64
TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": SIZE}


@pytest.fixture(scope="module")
def official():
    """The official modules (`models.Crane`, `models.prompt_ensemble`, `utils.*`), imported from its tree."""
    with official_code.crane_modules() as mods:
        yield mods


def _batch(ours):
    ds = al.data.load("synthetic:defects?size=64&n=2&seed=3", split="test")
    return ours.collate([ds[i] for i in range(len(ds))], augment=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inference_and_training_match_official(official, case, tmp_path):
    options, dino_model = CASES[case]
    torch.manual_seed(0)
    ours = al.create("crane", official_compat=True, **options, **TINY)
    model, learner, _ = crane_official_model(official, ours, dino_model, train=False)
    with torch.no_grad():  # non-trivial learned prompts
        for p in learner.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    torch.save({"prompt_learner": learner.state_dict()}, tmp_path / "epoch_5.pth")
    ours = convert(tmp_path / "epoch_5.pth", official_compat=True, **options, **TINY)
    batch = _batch(ours)

    text = crane_official_text(model, learner)
    scores, maps = crane_official_predict(
        official, model, text, batch.images, ours.layers, options["soft_mean"]
    )
    ours_out = ours.forward_batch(batch.images, ["object"] * len(scores), None)
    our_scores, our_maps = ours_out.scores, ours_out.maps
    np.testing.assert_allclose(our_scores.numpy(), scores, atol=1e-4)
    np.testing.assert_allclose(our_maps.numpy(), maps, atol=1e-4)

    learner.train_with_img_cls_prob = 1
    official_loss = crane_official_loss(
        official, model, learner, batch.images, batch.masks, batch.labels, ours.layers
    )
    official_loss.backward()
    ours.train()
    our_loss = ours.training_loss(batch)["loss"]
    our_loss.backward()
    assert our_loss.item() == pytest.approx(official_loss.item(), abs=1e-4)
    torch.testing.assert_close(ours.ctx_anomalous.grad, learner.ctx_neg.grad[0, 0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(
        ours.deep_prompts[0].grad, learner.compound_prompts_text[0].grad, atol=1e-4, rtol=1e-3
    )


def test_official_tokenizer_matches_ours(official):
    ours = al.create("crane", **TINY)
    model, learner, _ = crane_official_model(official, ours, "none", train=False)
    assert torch.equal(learner.tokenized_prompts_pos.reshape(-1).long(), ours.prompt_tokens[0])
    assert torch.equal(learner.tokenized_prompts_neg.reshape(-1).long(), ours.prompt_tokens[1])
