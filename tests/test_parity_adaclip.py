"""Parity with the official AdaCLIP code (caoyunkang/AdaCLIP), on identical random tiny weights.

Skipped unless ``$ANOMALENS_OFFICIAL/AdaCLIP`` holds a checkout of the official repository (never copied
into this tree). The official `AdaCLIP` model is built from its own classes (``method/clip_model.py``,
``method/adaclip.py``) with the test-tiny dimensions and our backbone's weights; its learned layers get
random values, its ``state_dict`` is saved as an official checkpoint and read back with our converter;
then scores and smoothed maps (official ``test.py``: ``aggregation=True``, Gaussian σ = 4), the training
loss and its gradients must agree to 1e-4 with ``official_compat=True``.

Adaptations, all outside its code: its package ``method/__init__.py`` (which imports the trainer, OpenCV
and plotting tools) is bypassed by importing ``method.adaclip`` under an empty package; a missing
``pkg_resources`` is stubbed; the checkout's BPE vocabulary is a Git LFS pointer, so its own tokenizer
class is given open_clip's copy of the same file. Its k-means has no seed (scikit-learn's global NumPy
state), so that state is seeded with our ``kmeans_seed`` before each official call; batch size 1, the
only one the official code runs. The loss glue follows ``AdaCLIP_Trainer.train_one_batch`` with its own
``FocalLoss`` and ``BinaryDiceLoss`` (its in-place normalisations read a copy, as CUDA autocast makes
them do), except that the mask keeps its batch axis (the official ``gt.squeeze()`` turns a batch of one
into an (S, S) mask, and its Dice then averages over image rows; see the method doc).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import official_code
from anomalens.contracts import TrainBatch
from anomalens.converters.adaclip import official_to_adaclip

pytestmark = pytest.mark.skipif(
    not official_code.available("adaclip"), reason="official AdaCLIP code not at $ANOMALENS_OFFICIAL/AdaCLIP"
)

SIZE = 96  # a 6x6 grid: 36 patches, enough for HSF's 5·k with k = 4
K = 4
TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": SIZE}
ATOL = 1e-4


@pytest.fixture(scope="module")
def official():
    """The official modules ``method.clip_model``, ``method.adaclip`` and ``loss``, imported from its tree."""
    with official_code.adaclip_modules() as mods:
        yield mods


@pytest.fixture(scope="module")
def models(official, tmp_path_factory):
    """(official AdaCLIP, our converted AdaClip) sharing backbone and learned weights."""
    path = tmp_path_factory.mktemp("official") / "pretrained.pth"
    return official_code.adaclip_pair(official, path, TINY, K)


def _image(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [1, 2])
def test_inference_matches_official(models, seed):
    model, ours = models
    image = _image(seed)
    score, smoothed = official_code.adaclip_official_predict(
        model, image, "metal-nut", ours.config.kmeans_seed
    )
    ours_out = ours.forward_batch(image, ["metal-nut"], None)
    torch.testing.assert_close(ours_out.scores, score, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_out.maps[0], torch.from_numpy(smoothed).float(), atol=ATOL, rtol=0)


def test_training_loss_and_gradients_match_official(models, official, monkeypatch):
    model, ours = models
    image = _image(3)
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 20:50, 30:70] = 1.0
    label = torch.ones(1)
    focal, dice = official.loss.FocalLoss(), official.loss.BinaryDiceLoss()
    # The official code normalises in place (``x /= x.norm()``), which autograd accepts only under CUDA
    # autocast, where ``norm`` reads an fp32 copy of its fp16 input; on CPU it reads a copy here too.
    norm = torch.Tensor.norm
    monkeypatch.setattr(torch.Tensor, "norm", lambda self, *a, **k: norm(self.clone(), *a, **k))
    model.zero_grad()
    np.random.seed(ours.config.kmeans_seed)
    maps, score = model(image, ["object"], aggregation=False)
    loss = focal(score, label.unsqueeze(1))
    for am in maps:
        loss = loss + focal(am, mask) + dice(am[:, 1], mask) + dice(am[:, 0], 1 - mask)
    loss.backward()
    monkeypatch.undo()

    ours.zero_grad()
    batch = TrainBatch(image, mask, label.long(), torch.ones(1, dtype=torch.bool), ["object"])
    out = ours.train().training_loss(batch)
    out["loss"].backward()
    ours.eval()
    assert out["loss"].item() == pytest.approx(loss.item(), abs=ATOL)

    grads = {
        name: p.grad if p.grad is not None else torch.zeros_like(p)
        for name, p in model.named_parameters()
        if "prompter" in name or "token_layer" in name or "prompt_generator" in name
    }
    expected = official_to_adaclip(grads, ours)
    for name, p in ours.named_parameters():
        if name in expected:
            scale = max(1.0, float(expected[name].abs().max()))
            torch.testing.assert_close(p.grad, expected[name], atol=ATOL * scale, rtol=0, msg=name)
