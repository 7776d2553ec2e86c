"""WinCLIP / WinCLIP+: equations on hand-checked tensors and behaviour on the tiny random backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomalens.methods.winclip as wc
from anomalens.backbones import window_indices
from anomalens.methods.base import create
from anomalens.ops import anchor_probability

SIZE = 64  # test-tiny, patch 16 → 4×4 grid


@pytest.fixture(scope="module")
def model() -> wc.WinCLIP:
    return create("winclip", backbone="test-tiny", pretrained=None, device="cpu", image_size=SIZE)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_harmonic_aggregation_hand_checked():
    # 2×3 grid, two 2×2 windows: {0,1,3,4} scored 0.5 and {1,2,4,5} scored 0.25.
    windows = window_indices((2, 3), 2)
    assert windows.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5]]
    coverage = wc.window_coverage(windows, 6)
    out = wc.harmonic_aggregation(torch.tensor([[0.5, 0.25]]), coverage)
    shared = 2 / (1 / 0.5 + 1 / 0.25)  # = 1/3
    torch.testing.assert_close(out, torch.tensor([[0.5, shared, 0.25, 0.5, shared, 0.25]]))
    torch.testing.assert_close(
        wc.harmonic_mean([torch.tensor([0.5]), torch.tensor([0.25])]), torch.tensor([shared])
    )


def test_harmonic_aggregation_of_a_zero_score_is_zero_not_nan():
    coverage = wc.window_coverage(window_indices((2, 3), 2), 6)
    out = wc.harmonic_aggregation(torch.tensor([[0.0, 0.25]]), coverage)
    assert torch.isfinite(out).all()
    assert out[0, 1] < 1e-9 and out[0, 2] == pytest.approx(0.25)


@pytest.mark.parametrize("size", [2, 3])
def test_window_coverage_counts(size):
    gh, gw = 4, 5
    coverage = wc.window_coverage(window_indices((gh, gw), size), gh * gw)
    assert coverage.shape == ((gh - size + 1) * (gw - size + 1), gh * gw)
    assert (coverage.sum(dim=1) == size * size).all()

    def covering(i: int, n: int) -> int:  # window starts s with s <= i < s + size
        return min(i, n - size) - max(0, i - size + 1) + 1

    expected = torch.tensor([[covering(r, gh) * covering(c, gw) for c in range(gw)] for r in range(gh)])
    assert torch.equal(coverage.sum(dim=0).view(gh, gw), expected.float())


def test_uncovered_patches_are_refused():
    # 80 px → 5×5 grid; 2×2 windows with stride 2 never reach the last row and column.
    with pytest.raises(ValueError, match="uncovered"):
        create("winclip", backbone="test-tiny", pretrained=None, device="cpu", image_size=80, stride=2)


def test_zero_shot_score_is_scaled_softmax():
    """§4.1 ascore_0 as WinCLIP computes it: the shared anchor probability of the unit embeddings."""
    anchors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    f = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cos with anchors: [1, 0.6] and [0, 0.8]
    expected = torch.tensor(
        [
            np.exp(10 * 0.6) / (np.exp(10 * 1.0) + np.exp(10 * 0.6)),
            np.exp(10 * 0.8) / (np.exp(0.0) + np.exp(10 * 0.8)),
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(
        anchor_probability(torch.nn.functional.normalize(f, dim=-1), anchors, 10.0), expected
    )


def test_association_distance_matches_naive():
    g = torch.Generator().manual_seed(0)
    queries, memory = torch.randn(2, 5, 8, generator=g), torch.randn(7, 8, generator=g)
    memory = torch.nn.functional.normalize(memory, dim=-1)
    naive = torch.empty(2, 5)
    for b in range(2):
        for q in range(5):
            cos = [float(queries[b, q] @ memory[r] / queries[b, q].norm()) for r in range(7)]
            naive[b, q] = 0.5 * (1 - max(cos))
    torch.testing.assert_close(wc.association_distance(queries, memory), naive)


def test_zero_shot_shapes_and_ranges(model):
    x = model.backbone.preprocess(list(_images(3, 0)))
    out = model.forward_batch(x, ["bottle"] * 3, None)
    scores, maps = out.scores, out.maps
    assert scores.shape == (3,) and maps.shape == (3, *model.backbone.grid)
    assert ((scores > 0) & (scores < 1)).all() and ((maps > 0) & (maps < 1)).all()
    pred = model.predict(_images(3, 0), class_names="bottle")
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(pred.scores, scores.numpy(), atol=1e-6)


def test_text_anchors_are_unit_norm_and_cached_per_class(model, monkeypatch):
    bottle, screw = model.text_anchors(["bottle", "screw"])
    assert bottle.shape == (2, model.backbone.embed_dim)
    torch.testing.assert_close(bottle.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(bottle, screw)

    def no_more_text(*args, **kwargs):
        raise AssertionError("text anchors were encoded again")

    monkeypatch.setattr(model.backbone, "encode_text", no_more_text)
    torch.testing.assert_close(model.text_anchors(["bottle"])[0], bottle)


def test_few_shot_with_the_query_in_support_halves_the_zero_shot_score(model):
    # A query identical to its support has every patch and window in memory: M_W = 0, so
    # score = (ascore_0 + 0) / 2 and map = (M_0 + 0) / 2.
    images = _images(2, 1)
    zero = model.predict(images[:1], class_names="bottle")
    few = model.predict(images[:1], class_names="bottle", support=images)
    np.testing.assert_allclose(few.scores, 0.5 * zero.scores, atol=1e-5)
    np.testing.assert_allclose(few.maps, 0.5 * zero.maps, atol=1e-5)


def test_few_shot_memory_shapes(model):
    images = model.backbone.preprocess(list(_images(2, 2)))
    support = model.prepare_support(images)
    gh, gw = model.backbone.grid
    n_patches = gh * gw
    assert support.patches.shape == (2 * n_patches, model.backbone.embed_dim)
    assert [w.shape[0] for w in support.windows] == [2 * (gh - s + 1) * (gw - s + 1) for s in (2, 3)]
    torch.testing.assert_close(support.patches.norm(dim=-1), torch.ones(2 * n_patches))


def test_few_shot_is_batch_invariant(model):
    images, support = _images(3, 3), _images(2, 4)
    batch = model.predict(images, class_names="bottle", support=support)
    for i in range(3):
        alone = model.predict(images[i : i + 1], class_names="bottle", support=support)
        np.testing.assert_allclose(alone.scores[0], batch.scores[i], atol=1e-5)
        np.testing.assert_allclose(alone.maps[0], batch.maps[i], atol=1e-5)
