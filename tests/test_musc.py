"""MuSc: LNAMD, MSM and RsCIN on hand-checked tensors; set-level invariances; errors; evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import anomalens as al
import anomalens.methods.musc as mu

TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": 64}


def _images(n: int, seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_layer_norm_map_standardises_each_image_over_all_entries():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]])  # (2, L=2, C=2)
    out = mu.layer_norm_map(tokens)
    expected0 = (torch.tensor([[1.0, 2.0], [3.0, 4.0]]) - 2.5) / math.sqrt(1.25 + 1e-5)
    expected1 = (torch.tensor([[0.0, 0.0], [0.0, 8.0]]) - 2.0) / math.sqrt(12.0 + 1e-5)
    torch.testing.assert_close(out, torch.stack([expected0, expected1]))


def test_lnamd_averages_the_neighbourhood_counting_zero_padding():
    v = torch.arange(9, dtype=torch.float32).view(3, 3)
    tokens = torch.stack([v.flatten(), torch.ones(9)], dim=-1)[None]  # (1, 9, 2): channel 1 is constant
    out = mu.lnamd(tokens, (3, 3), r=3)[0]  # (9, 2)
    corner = torch.tensor([(0 + 1 + 3 + 4) / 9, 4 / 9])  # 4 real neighbours, 5 zero-padded
    centre = torch.tensor([36 / 9, 1.0])
    torch.testing.assert_close(out[0], corner / corner.norm())
    torch.testing.assert_close(out[4], centre / centre.norm())
    torch.testing.assert_close(
        mu.lnamd(tokens, (3, 3), r=1)[0], torch.nn.functional.normalize(tokens[0], dim=-1)
    )


def test_patch_to_image_distances_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack(  # (N=3, L=2, C=2): the query image, then two references
        [torch.stack([e1, e2]), torch.stack([e1, -e1]), torch.stack([(e1 + e2) / math.sqrt(2), -e2])]
    )
    half = math.sqrt(2 - math.sqrt(2))  # cos 45° → √(2 − 2 cos)
    expected = torch.tensor([[[0.0, 0.0, half], [0.0, math.sqrt(2), half]]])  # (1, L=2, N=3): own is 0
    torch.testing.assert_close(mu.patch_to_image_distances(z, range(0, 1), tile=1), expected)
    torch.testing.assert_close(mu.patch_to_image_distances(z, range(0, 1), tile=3), expected)
    for tile in (1, 2):  # the whole set: pairs shared by two query tiles are multiplied once
        torch.testing.assert_close(mu.patch_to_image_distances(z, range(0, 3), tile)[:1], expected)


@pytest.mark.parametrize(
    ("rows", "tile"), [(range(0, 7), 1), (range(0, 7), 3), (range(2, 6), 2), (range(3, 4), 4)]
)
def test_patch_to_image_distances_do_not_depend_on_the_tiling(rows, tile):
    z = torch.nn.functional.normalize(
        torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    brute = torch.cdist(z[:, None], z[None]).amin(dim=-1)  # (N, N, L): i's patches to image j
    expected = brute.permute(0, 2, 1)[rows.start : rows.stop]  # (q, L, N)
    out = mu.patch_to_image_distances(z, rows, tile)
    others = torch.arange(7)[None] != torch.tensor(rows)[:, None]  # (q, N): own image (≈ 0) unused
    torch.testing.assert_close(out.permute(0, 2, 1)[others], expected.permute(0, 2, 1)[others])


def test_interval_average_by_hand():
    d = torch.tensor([[5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.0]])  # M = 10, sorted 0..9
    torch.testing.assert_close(mu.interval_average(d, (0.0, 0.3)), torch.tensor([1.0]))  # mean(0, 1, 2)
    torch.testing.assert_close(mu.interval_average(d, (0.1, 0.3)), torch.tensor([1.5]))  # mean(1, 2)
    few = torch.tensor([[0.4, 0.2, 0.9]])  # ⌊0.3·3⌋ = 0 entries: the lowest one instead
    torch.testing.assert_close(mu.interval_average(few, (0.0, 0.3)), torch.tensor([0.2]))


def test_rscin_by_hand():
    scores = torch.tensor([0.0, 1.0, 0.5])
    embeddings = torch.tensor(
        [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]
    )  # similarities .8 (a,b), 0 (a,c), .6 (b,c)
    torch.testing.assert_close(mu.rscin(scores, embeddings, [1]), scores)  # k = 1 keeps each image alone
    k2 = torch.tensor([0.8 / 1.8, 1.0 / 1.8, (0.5 + 0.6) / 1.6])
    torch.testing.assert_close(mu.rscin(scores, embeddings, [2]), k2)
    torch.testing.assert_close(mu.rscin(scores, embeddings, [1, 2]), (scores + k2) / 2)
    torch.testing.assert_close(mu.rscin(2 * scores + 3, embeddings, [1, 2]), (scores + k2) / 2)  # min-max
    torch.testing.assert_close(mu.rscin(scores, embeddings, [7]), mu.rscin(scores, embeddings, [3]))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return al.create("musc", **TINY)


def test_set_scores_do_not_depend_on_order_batching_or_chunking(model):
    images = _images(5, 1)
    ref = model.predict(images, "object")
    order = [3, 0, 4, 2, 1]
    permuted = model.predict(images[order], "object", batch_size=2)
    np.testing.assert_allclose(permuted.scores, ref.scores[order], atol=1e-5)
    np.testing.assert_allclose(permuted.maps, ref.maps[order], atol=1e-5)
    tiny_chunks = al.create("musc", chunk_mib=0.001, **TINY)  # one image pair per block
    chunked = tiny_chunks.predict(images, "object", batch_size=1)
    np.testing.assert_allclose(chunked.scores, ref.scores, atol=1e-5)
    np.testing.assert_allclose(chunked.maps, ref.maps, atol=1e-5)


def test_the_odd_image_out_scores_highest(model):
    same, odd = _images(1, 2), _images(1, 3)
    pred = model.predict(np.concatenate([same, same, odd, same]), "object")
    # Copies find an identical image among the others: their nearest-image distances are 0.
    np.testing.assert_allclose(pred.extras["map_max"][[0, 1, 3]], 0.0, atol=1e-3)
    assert pred.extras["map_max"][2] > 0.1
    assert pred.scores.argmax() == 2


def test_rscin_off_scores_are_the_map_maxima():
    plain = al.create("musc", rscin_k=(), **TINY)
    pred = plain.predict(_images(3, 4), "object")
    np.testing.assert_allclose(pred.scores, pred.maps.reshape(3, -1).max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(pred.scores, pred.extras["map_max"], rtol=1e-6)


def test_set_errors_are_one_clear_line(model):
    with pytest.raises(ValueError, match="at least 2"):
        model.predict(_images(1, 5))
    with pytest.raises(ValueError, match="one class"):
        model.predict(_images(2, 5), ["bottle", "screw"])
    with pytest.raises(ValueError, match="zero-shot"):
        model.predict(_images(2, 5), support=_images(1, 6))
    with pytest.raises(ValueError, match="r_list"):
        al.create("musc", r_list=(2,), **TINY)


def test_evaluation_scores_each_class_as_one_set(mvtec_root, monkeypatch):
    from anomalens.data import load
    from anomalens.evaluation import evaluate_method

    model = al.create("musc", **TINY)
    calls = []
    predict = model.predict
    monkeypatch.setattr(
        model, "predict", lambda images, *a, **k: calls.append(len(images)) or predict(images, *a, **k)
    )
    dataset = load(f"mvtec:{mvtec_root}", split="test")
    evaluate_method(model, [dataset], batch_size=2, progress=False)
    assert calls == [4, 4]  # one call per class with all 4 test images, whatever the batch size
