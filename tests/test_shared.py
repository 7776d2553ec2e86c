"""Shared helpers: the text-anchor cache of `Method`."""

from __future__ import annotations

import torch

from anomalens.methods.base import create, weights_fingerprint


def test_anchors_are_computed_once_per_class_and_follow_the_weights():
    method = create("winclip", backbone="test-tiny", pretrained=None, device="cpu")
    weight = torch.nn.Parameter(torch.ones(3))
    calls: list[list[str]] = []

    def compute(names: list[str]) -> torch.Tensor:
        calls.append(names)
        assert not torch.is_grad_enabled()
        return torch.stack([weight.double() * len(n) for n in names])  # (C, 3) float64

    first = method.cached_anchors(["bb", "a", "bb"], compute, [weight])
    assert calls == [["a", "bb"]]  # the missing names, each once
    assert first.dtype == torch.float32 and first.shape == (3, 3)
    torch.testing.assert_close(first[:, 0], torch.tensor([2.0, 1.0, 2.0]))
    method.cached_anchors(["a", "ccc"], compute, [weight])
    assert calls[1:] == [["ccc"]]
    with torch.no_grad():
        weight.mul_(2.0)
    again = method.cached_anchors(["a"], compute, [weight])
    assert calls[2:] == [["a"]]  # new weights: everything is computed again
    torch.testing.assert_close(again, torch.full((1, 3), 2.0))


def test_weights_fingerprint_sees_a_change_of_any_tensor():
    a, b = torch.zeros(2), torch.ones(3)
    before = weights_fingerprint([a, b])
    assert before == weights_fingerprint([a.clone(), b.clone()]) and weights_fingerprint([]) == ()
    b[1] = -1.0  # same sum of squares, another sum
    assert weights_fingerprint([a, b]) != before
