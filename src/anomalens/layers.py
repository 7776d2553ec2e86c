"""Small reusable modules of the implemented methods: residual adapters, projections, gates, heads.

Every module works on the last dimension, so tokens (B, N, D), sequence-first (N, B, D) and pooled
(B, D) inputs all work. Widths always come from the caller (the backbone), never from literals.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NormMatchedResidualAdapter(nn.Module):
    """AA-CLIP residual adapter, Eq. (1)-(2) of AA-CLIP (002 §3.2.1), as the official code reads them.

        a = LeakyReLU(W x)              W: (D, D), no bias, xavier-uniform init; slope 0.01
        a <- a * ||x|| / ||a||          per token: "Norm" matches the adapter output to the token's norm
        x <- lam * a + (1 - lam) * x    lam = 0.1

    Applied to every token, after the MLP of each of the first K blocks. ``||a||`` is clamped at 1e-12
    (the official code divides unguarded; the clamp only acts on an all-zero adapter output).
    """

    def __init__(self, dim: int, lam: float = 0.1):
        super().__init__()
        self.lam = lam
        self.fc = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.leaky_relu(self.fc(x))  # (..., D)
        a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.lam * a + (1.0 - self.lam) * x


class BiasFreeProjection(nn.Module):
    """Linear map without bias, optionally followed by LeakyReLU (slope 0.01); xavier-uniform init.

    AA-CLIP's learnable text projection (768->768 with LeakyReLU, replacing CLIP's ``text_projection``)
    and its image projectors ``seg_proj`` / ``det_proj`` (1024->768, no activation by default).
    """

    def __init__(self, in_dim: int, out_dim: int, act: bool):
        super().__init__()
        self.act = act
        self.fc = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return F.leaky_relu(y) if self.act else y


class BottleneckMLP(nn.Module):
    """Bias-free bottleneck D -> D/reduction -> D with LeakyReLU in between, xavier-uniform init.

    Our reading of CoRe-CLIP's CSR_b (Eq. 11) and TR (Eq. 13), which the paper only calls a "residual
    module" / "two-layer MLP": bias-free and xavier-initialised like the AA-CLIP adapters it builds on,
    no activation on the output so the residual update can take either sign.
    """

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(f"BottleneckMLP: dim {dim} // reduction {reduction} leaves no hidden unit")
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.xavier_uniform_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.leaky_relu(self.down(x)))


class GatedResidual(nn.Module):
    """x <- (1 - g) * x + g * f(x) with a learnable gate g = sigmoid(theta) in (0, 1).

    CoRe-CLIP Eq. (11) (lambda_i, CSR adapters) and Eq. (13) (gamma_i, text refinement). The paper gives
    no initial value; ``init = 0.1`` starts from AA-CLIP's fixed lambda.
    """

    def __init__(self, module: nn.Module, init: float = 0.1):
        super().__init__()
        if not 0.0 < init < 1.0:
            raise ValueError(f"GatedResidual: init must be in (0, 1), got {init}")
        self.module = module
        self.theta = nn.Parameter(torch.tensor(math.log(init / (1.0 - init))))

    @property
    def gate(self) -> torch.Tensor:
        """The current gate value g = sigmoid(theta)."""
        return torch.sigmoid(self.theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate
        return (1.0 - g) * x + g * self.module(x)


class ScoreHead(nn.Module):
    """InCTRL's scoring head: [Linear -> ReLU -> BatchNorm1d] per hidden width, then Linear(., 1) -> sigmoid.

    The official ``TransformerBasicHead`` (640->128->64->1 for eta_ref, 225->128->64->1 for eta_h) with
    PyTorch's default init. Input (..., in_dim), output (...) in (0, 1); batch-norm statistics are taken
    over all leading positions. Official checkpoint keys map as ``projection{i+1}`` -> ``linears.{i}``,
    ``bn{i+2}`` -> ``norms.{i}``; the official ``bn1`` is never used in its forward and has no
    counterpart here.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (128, 64)):
        super().__init__()
        widths = (in_dim, *hidden)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in hidden)
        self.out = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])  # (N, in_dim)
        for linear, norm in zip(self.linears, self.norms, strict=True):
            h = norm(F.relu(linear(h)))
        return torch.sigmoid(self.out(h)).reshape(lead)


class InCTRLAdapter(nn.Module):
    """InCTRL's image adapter phi: Linear(D, D/r) -> ReLU -> Linear(D/r, D) -> ReLU, both bias-free.

    Official code (``Adapter(640, 4)``, OFFICIAL_CODE_NOTES §3), PyTorch's default init; the final ReLU
    is part of it. Parameter names match the official state dict (``fc.0.weight``, ``fc.2.weight``).
    """

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(f"InCTRLAdapter: dim {dim} // reduction {reduction} leaves no hidden unit")
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, dim, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
