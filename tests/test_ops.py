"""Shared operations: the blur against scipy, the nearest-neighbour search against brute force, the
anchor probability by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomalens import ops


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------- blur
def test_gaussian_kernel_by_hand():
    e = math.exp(-0.5)
    expected = torch.tensor([e, 1.0, e], dtype=torch.float64) / (1 + 2 * e)
    torch.testing.assert_close(ops.gaussian_kernel1d(1.0, 1), expected)


@pytest.mark.parametrize("border", ops.BORDERS)
def test_border_indices_by_hand(border):
    # a b c d padded by 3 (scipy: "reflect" d c b a | a b c d | d c b a, "mirror" d c b | a b c d | c b a)
    expected = {"reflect": [2, 1, 0, 0, 1, 2, 3, 3, 2, 1], "mirror": [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]}
    assert ops.border_indices(4, 3, border).tolist() == expected[border]
    assert ops.border_indices(1, 2, border).tolist() == [0] * 5


@pytest.mark.parametrize("border", ops.BORDERS)
@pytest.mark.parametrize("sigma", [0.7, 1.5, 4.0])
def test_gaussian_blur_equals_scipy(border, sigma):
    # 9×7 maps with σ = 4 (radius 16) reflect more than once at every border.
    maps = _rand(3, 9, 7)
    expected = np.stack([ndimage.gaussian_filter(m, sigma, mode=border) for m in maps.double().numpy()])
    np.testing.assert_allclose(ops.gaussian_blur(maps, sigma, border=border).numpy(), expected, atol=1e-5)
    doubles = ops.gaussian_blur(maps.double(), sigma, border=border)
    assert doubles.dtype == torch.float64
    np.testing.assert_allclose(doubles.numpy(), expected, atol=1e-12)


def test_gaussian_blur_radius_and_truncate_equal_scipy():
    maps = _rand(2, 12, 10, seed=1)
    for radius, sigma in ((3, 1.0), (4, 1.5)):  # AA-CLIP's kornia 7×7 σ=1 and 9×9 σ=1.5
        expected = np.stack(
            [ndimage.gaussian_filter(m, sigma, mode="mirror", radius=radius) for m in maps.numpy()]
        )
        got = ops.gaussian_blur(maps, sigma, radius=radius, border="mirror")
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    expected = np.stack([ndimage.gaussian_filter(m, 2.0, truncate=2.5) for m in maps.numpy()])
    np.testing.assert_allclose(ops.gaussian_blur(maps, 2.0, truncate=2.5).numpy(), expected, atol=1e-5)


def test_blur_matrix_by_hand():
    # n = 2, radius 1, taps [a, b, a]; "reflect" pads x0 x1 as x0 | x0 x1 | x1: y0 = (a+b)x0 + a x1.
    k = ops.gaussian_kernel1d(1.0, 1)
    a, b = float(k[0]), float(k[1])
    expected = torch.tensor([[a + b, a], [a, a + b]], dtype=torch.float64)
    torch.testing.assert_close(ops.blur_matrix(2, 1.0, 1, "reflect"), expected)
    # "mirror" pads as x1 | x0 x1 | x0: y0 = b x0 + 2a x1.
    torch.testing.assert_close(
        ops.blur_matrix(2, 1.0, 1, "mirror"), torch.tensor([[b, 2 * a], [2 * a, b]]).double()
    )
    assert torch.allclose(
        ops.blur_matrix(9, 2.0, 8, "reflect").sum(dim=0), torch.ones(9, dtype=torch.float64)
    )


def test_gaussian_blur_leading_dims_and_identity():
    maps = _rand(2, 3, 8, 8, seed=2)
    blurred = ops.gaussian_blur(maps, 1.0)
    assert blurred.shape == maps.shape and blurred.is_contiguous()
    torch.testing.assert_close(blurred[1, 2], ops.gaussian_blur(maps[1, 2][None], 1.0)[0])
    assert ops.gaussian_blur(maps, 0.0) is maps
    assert ops.gaussian_blur(maps, 1.0, radius=0) is maps
    # a constant map stays constant (the kernel sums to 1, borders repeat values)
    torch.testing.assert_close(ops.gaussian_blur(torch.full((1, 5, 4), 3.0), 2.0), torch.full((1, 5, 4), 3.0))
    with pytest.raises(ValueError, match="border"):
        ops.gaussian_blur(maps, 1.0, border="wrap")


# ---------------------------------------------------------------------- nearest neighbours
def test_nearest_by_hand():
    queries = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    bank = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    torch.testing.assert_close(ops.nearest_distance(queries, bank), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(ops.nearest_similarity(queries, bank), torch.tensor([0.0, 21.0]))


@pytest.mark.parametrize("chunk", [1, 7, 50, ops.NN_CHUNK_ELEMENTS])
def test_nearest_equals_brute_force_at_every_chunk_size(chunk):
    queries, bank = _rand(2, 5, 4, seed=3) - 0.5, _rand(9, 4, seed=4) - 0.5
    diff = queries[:, :, None] - bank[None, None]  # (2, 5, 9, 4)
    torch.testing.assert_close(
        ops.nearest_distance(queries, bank, chunk), diff.norm(dim=-1).amin(dim=-1), atol=1e-5, rtol=1e-5
    )
    brute = torch.einsum("bqd,rd->bqr", queries.double(), bank.double()).amax(dim=-1)
    torch.testing.assert_close(
        ops.nearest_similarity(queries, bank, chunk).double(), brute, atol=1e-6, rtol=0
    )


def test_nearest_distance_equals_cdist_across_chunks():
    g = torch.Generator().manual_seed(0)
    queries, bank = 3 * torch.randn(7, 5, generator=g), 3 * torch.randn(11, 5, generator=g)
    naive = torch.cdist(queries.double(), bank.double()).amin(dim=1).float()
    for chunk in (ops.NN_CHUNK_ELEMENTS, 20):  # one block, then several blocks of queries
        torch.testing.assert_close(ops.nearest_distance(queries, bank, chunk), naive, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 13, ops.NN_CHUNK_ELEMENTS])
def test_nearest_with_one_bank_per_group(chunk):
    queries, bank = _rand(2, 3, 6, 4, seed=5), _rand(2, 3, 8, 4, seed=6)  # (B, L, Q, D), (B, L, R, D)
    brute = torch.einsum("blqd,blrd->blqr", queries.double(), bank.double()).amax(dim=-1)
    got = ops.nearest_similarity(queries, bank, chunk)
    assert got.shape == (2, 3, 6)
    torch.testing.assert_close(got.double(), brute, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="does not match"):
        ops.nearest_similarity(queries, bank[:1])


def test_nearest_is_batch_invariant():
    queries, bank = _rand(6, 10, 8, seed=7), _rand(40, 8, seed=8)
    batch = ops.nearest_distance(queries, bank, chunk_elements=100)
    alone = torch.stack([ops.nearest_distance(q[None], bank, chunk_elements=100)[0] for q in queries])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- anchors
def test_anchor_logits_and_probability_by_hand():
    anchors = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # (1, 2, E) [t_n, t_a]
    patches = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # (1, N=2, E)
    logits = ops.anchor_logits(patches, anchors, 10.0)
    torch.testing.assert_close(logits, torch.tensor([[[0.0, 8.0], [10.0, 6.0]]]))
    torch.testing.assert_close(ops.anchor_probability(patches, anchors, 10.0), logits.softmax(dim=-1)[..., 1])
    # one image embedding, s = 1: softmax([1, 0.6])_a = 1 / (1 + e^0.4)
    p = ops.anchor_probability(torch.tensor([[1.0, 0.0]]), anchors, 1.0)
    torch.testing.assert_close(p, torch.tensor([1.0 / (1.0 + math.exp(0.4))]))


def test_anchor_logits_shared_and_per_image_anchors():
    features = _rand(3, 4, 5, 6, seed=9)  # (B, h, w, E)
    anchors = _rand(2, 6, seed=10)
    shared = ops.anchor_logits(features, anchors, 2.0)
    assert shared.shape == (3, 4, 5, 2)
    torch.testing.assert_close(shared, 2.0 * torch.einsum("bhwe,ke->bhwk", features, anchors))
    per_image = ops.anchor_logits(features, anchors.expand(3, 2, 6), 2.0)
    torch.testing.assert_close(per_image, shared)
    torch.testing.assert_close(ops.anchor_logits(features, anchors[None], 2.0), shared)
