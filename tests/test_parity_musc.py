"""Parity of MuSc's LNAMD, MSM and RsCIN with the official modules (xrli-U/MuSc), from patch tokens on.

Skipped unless ``$ANOMALENS_OFFICIAL/MuSc`` holds a checkout of the official repository (never copied
into this tree). The official ``models/modules/_LNAMD.py``, ``_MSM.py`` and ``_RsCIN.py`` are loaded
from their files and run as ``models/musc.py`` runs them (per r: ``LNAMD._embed`` then L2
normalisation; per layer ``MSM(Z, topmin_min=0, topmin_max=0.3)``; mean over layers, then over r;
``RsCIN(max of the maps, CLS embeddings, k_list)``). What is compared: given the same per-layer patch
tokens (random, CLS included) and CLS embeddings, our `MuSc.mutual_scores` and `rscin` give the same
patch scores and image scores to 1e-4. The backbone itself is not part of this test (the official
code ships its own modified open_clip; ours runs open_clip's blocks unchanged, see
tests/test_backbones.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomalens as al
import official_code
from anomalens.methods.musc import layer_norm_map, rscin

pytestmark = pytest.mark.skipif(
    not official_code.available("musc"), reason="official MuSc code not at $ANOMALENS_OFFICIAL/MuSc"
)


def test_mutual_scores_and_rscin_match_official():
    mods = official_code.musc_modules()
    model = al.create("musc", backbone="test-tiny", pretrained=None, device="cpu", image_size=96)
    gh, gw = model.backbone.grid  # 6 × 6
    n, c, layers = 6, 16, 2
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(n, 1 + gh * gw, c, generator=g) * 3 + 1 for _ in range(layers)]  # CLS first

    official = official_code.musc_official_scores(mods, tokens, model.config.r_list)  # (N, L)

    ours = model.mutual_scores([layer_norm_map(t[:, 1:]) for t in tokens])  # (N, L)
    torch.testing.assert_close(ours.double(), official.double(), atol=1e-4, rtol=1e-4)

    cls = F.normalize(torch.randn(n, 8, generator=g) + 2, dim=-1)
    peak = ours.amax(dim=1)
    ref = mods.RsCIN.RsCIN(peak.double().numpy(), list(cls.numpy()), k_list=[1, 2, 3])
    np.testing.assert_allclose(rscin(peak, cls, (1, 2, 3)).numpy(), ref, atol=1e-5)
