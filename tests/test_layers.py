"""Reusable modules: shapes, initialisation, and each formula on a hand-checked tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from anomalens.layers import (
    BiasFreeProjection,
    BottleneckMLP,
    GatedResidual,
    InCTRLAdapter,
    NormMatchedResidualAdapter,
    ScoreHead,
)


def _set(linear: nn.Linear, weight: list, bias: list | None = None) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))
        if bias is not None:
            linear.bias.copy_(torch.tensor(bias))


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_norm_matched_adapter_eq_1_2_by_hand():
    adapter = NormMatchedResidualAdapter(2, lam=0.1)
    _set(adapter.fc, [[1.0, 0.0], [0.0, -1.0]])
    # x = [3, 4]: W x = [3, -4]; LeakyReLU -> [3, -0.04]; rescale to |x| = 5; 0.1 a + 0.9 x.
    a = [3.0, -0.04]
    scale = 5.0 / math.hypot(*a)
    expected = torch.tensor([0.1 * a[0] * scale + 0.9 * 3.0, 0.1 * a[1] * scale + 0.9 * 4.0])
    torch.testing.assert_close(adapter(torch.tensor([3.0, 4.0])), expected)


def test_norm_matched_adapter_matches_each_tokens_norm():
    torch.manual_seed(0)
    adapter = NormMatchedResidualAdapter(16, lam=1.0)  # lam = 1 leaves only the rescaled adapter output
    x = torch.randn(2, 5, 16) * torch.tensor([1.0, 10.0, 0.1, 3.0, 7.0]).view(1, 5, 1)
    out = adapter(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(NormMatchedResidualAdapter(16, lam=0.0)(x), x)


def test_norm_matched_adapter_init_is_bias_free_xavier():
    torch.manual_seed(0)
    adapter = NormMatchedResidualAdapter(64)
    assert adapter.fc.bias is None and adapter.lam == 0.1
    w = adapter.fc.weight
    bound = _xavier_bound(64, 64)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    # Uniform(-b, b) has std b/sqrt(3); PyTorch's default Linear init would give 1/sqrt(3*64) (2x smaller).
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_bias_free_projection():
    proj = BiasFreeProjection(2, 3, act=True)
    assert proj.fc.bias is None and proj.fc.weight.shape == (3, 2)
    _set(proj.fc, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([-2.0, 3.0])
    torch.testing.assert_close(proj(x), torch.tensor([-0.02, 3.0, 1.0]))
    plain = BiasFreeProjection(2, 3, act=False)
    _set(plain.fc, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(plain(x), torch.tensor([-2.0, 3.0, 1.0]))
    assert BiasFreeProjection(8, 4, act=False)(torch.randn(2, 7, 8)).shape == (2, 7, 4)
    assert BiasFreeProjection(100, 100, act=False).fc.weight.abs().max() <= _xavier_bound(100, 100)


def test_bottleneck_mlp_formula_and_shapes():
    mlp = BottleneckMLP(4, reduction=4)
    assert mlp.down.weight.shape == (1, 4) and mlp.up.weight.shape == (4, 1)
    assert mlp.down.bias is None and mlp.up.bias is None
    _set(mlp.down, [[1.0, 1.0, 1.0, 1.0]])
    _set(mlp.up, [[1.0], [-1.0], [2.0], [0.0]])
    # down: 1 - 2 = -1 -> LeakyReLU -0.01 -> up: [-0.01, 0.01, -0.02, 0]; no output activation.
    torch.testing.assert_close(
        mlp(torch.tensor([1.0, -2.0, 0.0, 0.0])), torch.tensor([-0.01, 0.01, -0.02, 0.0])
    )
    assert BottleneckMLP(64)(torch.randn(3, 10, 64)).shape == (3, 10, 64)
    with pytest.raises(ValueError):
        BottleneckMLP(3, reduction=4)


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_gated_residual_formula_init_and_range():
    gated = GatedResidual(_Double(), init=0.1)
    assert gated.gate.item() == pytest.approx(0.1, abs=1e-6)
    x = torch.tensor([1.0, -3.0])
    # (1 - 0.1) x + 0.1 * 2x = 1.1 x
    torch.testing.assert_close(gated(x), 1.1 * x)
    gated(x).sum().backward()
    assert gated.theta.grad is not None and gated.theta.grad.item() != 0
    with torch.no_grad():
        for theta in (-50.0, 50.0):
            gated.theta.fill_(theta)
            assert 0.0 <= gated.gate.item() <= 1.0
    assert GatedResidual(_Double(), init=0.7).gate.item() == pytest.approx(0.7, abs=1e-6)
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError):
            GatedResidual(_Double(), init=bad)


def test_score_head_linear_relu_batchnorm_order_by_hand():
    head = ScoreHead(2, hidden=(2,)).eval()
    _set(head.linears[0], [[1.0, 0.0], [0.0, 1.0]], [0.0, -1.0])
    _set(head.out, [[2.0, 3.0]], [0.25])
    norm = head.norms[0]
    with torch.no_grad():
        norm.running_mean.fill_(0.5)
        norm.running_var.fill_(1.0 - norm.eps)  # sqrt(var + eps) = 1
    # x = [1, 0.5]: Linear -> [1, -0.5]; ReLU -> [1, 0]; BN -> [0.5, -0.5]; 2*0.5 + 3*(-0.5) + 0.25 = -0.25.
    # (BN before ReLU would give [0.5, -1] -> [0.5, 0] -> 1.25.)
    out = head(torch.tensor([[1.0, 0.5]]))
    assert out.shape == (1,)
    assert out.item() == pytest.approx(1 / (1 + math.exp(0.25)), rel=1e-6)


def test_score_head_shapes_range_and_parameter_layout():
    torch.manual_seed(0)
    head = ScoreHead(16)
    out = head(torch.randn(8, 16))  # train mode: batch statistics
    assert out.shape == (8,) and torch.all((out > 0) & (out < 1))
    head.eval()
    assert head(torch.randn(2, 3, 16)).shape == (2, 3)
    shapes = {
        k: tuple(v.shape) for k, v in head.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    assert shapes == {
        "linears.0.weight": (128, 16),
        "linears.0.bias": (128,),
        "linears.1.weight": (64, 128),
        "linears.1.bias": (64,),
        "norms.0.weight": (128,),
        "norms.0.bias": (128,),
        "norms.0.running_mean": (128,),
        "norms.0.running_var": (128,),
        "norms.1.weight": (64,),
        "norms.1.bias": (64,),
        "norms.1.running_mean": (64,),
        "norms.1.running_var": (64,),
        "out.weight": (1, 64),
        "out.bias": (1,),
    }


def test_inctrl_adapter_formula_and_official_key_names():
    adapter = InCTRLAdapter(4, reduction=4)
    assert {k: tuple(v.shape) for k, v in adapter.state_dict().items()} == {
        "fc.0.weight": (1, 4),
        "fc.2.weight": (4, 1),
    }
    _set(adapter.fc[0], [[1.0, -1.0, 0.0, 0.0]])
    _set(adapter.fc[2], [[1.0], [-1.0], [2.0], [0.0]])
    # x = [3, 1, 0, 0]: 2 -> ReLU 2 -> [2, -2, 4, 0] -> ReLU [2, 0, 4, 0]
    torch.testing.assert_close(
        adapter(torch.tensor([3.0, 1.0, 0.0, 0.0])), torch.tensor([2.0, 0.0, 4.0, 0.0])
    )
    # x = [1, 3, 0, 0]: -2 -> ReLU 0 -> zeros
    torch.testing.assert_close(adapter(torch.tensor([1.0, 3.0, 0.0, 0.0])), torch.zeros(4))
    assert InCTRLAdapter(640)(torch.randn(5, 640)).shape == (5, 640)
    with pytest.raises(ValueError):
        InCTRLAdapter(2, reduction=4)
