"""CoRe-CLIP (paper 000): every implemented equation on a hand-checked tensor, the batched three-branch
forward, the training stages, and learning on unseen subject-context pairs with `test-tiny`."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import anomalens as al
from anomalens.contracts import override_schedule
from anomalens.data import balanced_subset
from anomalens.methods.base import TrainBatch
from anomalens.methods.core_clip import (
    CRM,
    BottleneckMLP,
    ContextBatch,
    CoReCLIP,
    CSRLayer,
    GatedResidual,
    calibration_loss,
    compatibility,
    compatibility_ce,
    consistency_loss,
    crm_fuse,
    crm_weights,
    csr_update,
    fuse_consistency_loss,
    fused_margins,
    grounding_loss,
    image_objective,
    image_score,
    masked_views,
    negative_entropy,
    orthogonality_loss,
    patch_margins,
    prompt_anchor_pair,
    text_objective,
    warmup_factor,
)
from anomalens.prompts import core_clip_prompts
from helpers import differ

SIZE = 64
TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": SIZE}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and a busy 2-core machine loses a lot to them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**options) -> CoReCLIP:
    torch.manual_seed(0)
    return al.create("core-clip", **TINY, **options)


@pytest.fixture(scope="module")
def model() -> CoReCLIP:
    return _model()


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------------------------ equations
def test_eq10_masked_views_by_hand():
    x = torch.arange(1.0, 13.0).view(1, 3, 2, 2)  # channel c holds 4c+1 .. 4c+4
    m = _t([[[1, 0], [0, 1]]])
    s, c = masked_views(x, m, torch.tensor(0.0))
    torch.testing.assert_close(s[0, 0], _t([[1, 0], [0, 4]]))
    torch.testing.assert_close(c[0, 2], _t([[0, 10], [11, 0]]))
    fill = _t([-1, -2, -3]).view(1, 3, 1, 1)
    s, c = masked_views(x, m, fill)
    torch.testing.assert_close(s[0, 1], _t([[5, -2], [-2, 8]]))
    torch.testing.assert_close(c[0, 0], _t([[-1, 2], [3, -1]]))


def test_eq11_csr_update_by_hand():
    # (1 - 0.25)·[1, 2] + 0.25·[3, -2] = [1.5, 1.0]
    torch.testing.assert_close(csr_update(_t([1, 2]), _t([3, -2]), torch.tensor(0.25)), _t([1.5, 1.0]))


def test_eq11_csr_layer_gives_each_branch_its_own_module():
    layer = CSRLayer(width=2, n_branches=2, reduction=1, gate_init=0.25)
    assert float(layer.lam.detach()) == pytest.approx(0.25)
    with torch.no_grad():
        for k, mlp in enumerate(layer.modules_per_branch):
            mlp.down.weight.copy_(torch.eye(2))
            mlp.up.weight.copy_(torch.eye(2) * (k + 1))  # branch 0: identity on x > 0, branch 1: 2x
    x = _t([[[1, 2]], [[1, 2]]])  # (2·B, M, D) with B = 1, M = 1: branch 0 row, branch 1 row
    out = layer(x)
    torch.testing.assert_close(out[0, 0], _t([1, 2]))  # 0.75·x + 0.25·x
    torch.testing.assert_close(out[1, 0], _t([1.25, 2.5]))  # 0.75·x + 0.25·2x
    torch.testing.assert_close(layer(x[1:], branch_ids=[1]), out[1:])


def test_eq12_batched_branches_equal_separate_passes(model):
    views = torch.randn(3, 2, 3, SIZE, SIZE)
    with torch.no_grad():
        joint = model.encode_branches(views)
        for k in range(3):
            alone = model.encode_branches(views[k : k + 1], branch_ids=[k])
            torch.testing.assert_close(joint.cls[:, k], alone.cls[:, 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(joint.patches[:, k], alone.patches[:, 0], atol=1e-5, rtol=1e-5)
    n = model.backbone.grid[0] * model.backbone.grid[1]
    assert joint.cls.shape == (2, 3, model.backbone.embed_dim)
    assert joint.patches.shape == (2, 3, n, model.backbone.embed_dim)
    torch.testing.assert_close(joint.cls.norm(dim=-1), torch.ones(2, 3))
    # The branches really differ: each has its own CSR modules.
    assert differ(joint.cls[:, 0], model.encode_branches(views[:1], branch_ids=[1]).cls[:, 0])


def test_eq12_cls_is_the_projected_class_token(model):
    x = torch.randn(2, 3, SIZE, SIZE)
    adapters = {i: layer for i, layer in zip(model.csr_layers, model.csr, strict=True)}
    with torch.no_grad():
        reference = model.backbone.encode_image(torch.cat([x, x, x]), adapters=adapters).cls  # (3B, E)
        feats = model.encode_branches(x.expand(3, *x.shape))
    expected = torch.nn.functional.normalize(reference, dim=-1).view(3, 2, -1).transpose(0, 1)
    torch.testing.assert_close(feats.cls, expected, atol=1e-5, rtol=1e-5)


def test_eq13_gated_text_refinement_by_hand():
    swap = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        swap.weight.copy_(_t([[0, 1], [1, 0]]))
    # (1 - 0.25)·[1, 3] + 0.25·[3, 1] = [1.5, 2.5]
    torch.testing.assert_close(GatedResidual(swap, init=0.25)(_t([1, 3])), _t([1.5, 2.5]))


def test_layer_counts_are_mapped_to_the_backbone(model):
    # K = 6 of 24 visual and L = 3 of 12 text blocks -> round(6·4/24) = 1 and round(3·4/12) = 1.
    assert model.csr_layers == [1] and model.text_layers == [1]
    assert len(model.csr[0].modules_per_branch) == 3
    with torch.no_grad():
        refined = model.class_text(["cow"])
        model.text_refiners[0].theta.fill_(-40.0)  # γ -> 0: CLIP's own text tower
        plain = model.class_text(["cow"])
        model.text_refiners[0].theta.fill_(math.log(0.1 / 0.9))
        normal, anomalous = core_clip_prompts("cow")
        assert len(normal) == len(anomalous) == 12  # 4 sentences x 3 templates (App. B.3)
        encode = model.backbone.encode_text
        tokenize = model.backbone.tokenize
        clip_pair = prompt_anchor_pair(encode(tokenize(normal)), encode(tokenize(anomalous)))
    torch.testing.assert_close(plain[0], clip_pair, atol=1e-6, rtol=1e-6)
    assert differ(refined, plain)


def test_b3_prompt_anchors_by_hand():
    # normalise [3, 4] -> [0.6, 0.8] and [0, 2] -> [0, 1]; mean [0.3, 0.9]; re-normalise.
    pair = prompt_anchor_pair(_t([[3, 4], [0, 2]]), _t([[5, 0]]))
    torch.testing.assert_close(pair, _t([[0.3, 0.9], [1.0, 0.0]]) / _t([[math.sqrt(0.9)], [1.0]]))


def test_eq14_orthogonality_by_hand():
    text = _t([[[1, 0], [0.6, 0.8]], [[1, 0], [0, 1]]])  # ⟨⟩ = 0.6 and 0
    torch.testing.assert_close(orthogonality_loss(text), torch.tensor(0.18))


def test_eq15_consistency_by_hand():
    # μ = [0.5, 0.5]; ‖t0 − μ‖² = ‖t1 − μ‖² = 0.5; ½(0.5 + 0.5) = 0.5. Equal embeddings cost 0.
    text = _t([[[1, 0], [0, 1]], [[0.6, 0.8], [0.6, 0.8]]])
    torch.testing.assert_close(consistency_loss(text[:1]), torch.tensor(0.5))
    torch.testing.assert_close(consistency_loss(text), torch.tensor(0.25))


def test_eq16_grounding_by_hand():
    # t̃μ = [0.5, 0.5]; cos([2, 0], t̃μ) = 1/√2.
    loss = grounding_loss(_t([[2, 0]]), _t([[[1, 0], [0, 1]]]))
    torch.testing.assert_close(loss, torch.tensor(1 - 1 / math.sqrt(2)))


def test_eq17_text_objective_by_hand():
    total = text_objective(torch.tensor(0.36), torch.tensor(0.5), torch.tensor(0.3), (0.1, 0.1, 0.05))
    torch.testing.assert_close(total, torch.tensor(0.036 + 0.05 + 0.015))
    with_calib = text_objective(
        torch.tensor(0.36), torch.tensor(0.5), torch.tensor(0.3), (0.1, 0.1, 0.05), torch.tensor(2.0), 0.03
    )
    torch.testing.assert_close(with_calib, torch.tensor(0.036 + 0.05 + 0.015 + 0.06))


def test_eq18_compatibility_by_hand():
    cos = compatibility(_t([[[1, 0], [0, 1]]]), _t([[[0.6, 0.8], [0, 1]]]))
    torch.testing.assert_close(cos, _t([[[0.6, 0.0], [0.8, 1.0]]]))


def test_eq19_21_crm_weights_by_hand():
    # q·k / √2 = [√2, 0, −√2]; softmax.
    alpha = crm_weights(_t([[1, 0]]), _t([[[2, 0], [0, 5], [-2, 0]]]))
    e = torch.exp(_t([math.sqrt(2), 0, -math.sqrt(2)]))
    torch.testing.assert_close(alpha, (e / e.sum())[None])
    crm = CRM(embed_dim=2, attention_dim=2)
    with torch.no_grad():
        crm.w_q.weight.copy_(_t([[2, 0], [0, 0]]))  # q = W_q t̃1 = [2 t_x, 0]
        crm.w_k.weight.copy_(torch.eye(2))
    t1, z = _t([[0.5, 9.0]]), _t([[[2, 0], [0, 5], [-2, 0]]])
    torch.testing.assert_close(crm(t1, z), alpha)


def test_eq22_crm_fusion_by_hand():
    fused = crm_fuse(_t([[0.5, 0.25, 0.25]]), _t([[[1, 0], [0, 1], [0, -1]]]))
    torch.testing.assert_close(fused, _t([[0.5, 0.0]]))


def test_eq23_24_cross_entropy_by_hand():
    # logits [0, ln 3] -> p1 = 3/4; CE(y=1) = −ln 0.75, CE(y=0) = −ln 0.25.
    logits = _t([[0, math.log(3)], [0, math.log(3)]])
    torch.testing.assert_close(
        compatibility_ce(logits, torch.tensor([1, 0])), torch.tensor(-(math.log(0.75) + math.log(0.25)) / 2)
    )


def test_eq25_fuse_consistency_by_hand():
    branches = _t([[[0, 0], [2, 2], [1, 4]], [[0, 0], [2, 2], [1, 4]]])  # mean [1, 2]
    fused = _t([[1, 2], [2, 2]])  # differences [0, 0] and [1, 0]
    torch.testing.assert_close(fuse_consistency_loss(fused, branches), torch.tensor(0.5))


def test_eq26_negative_entropy_by_hand():
    # −H([½, ½]) = −ln 2, −H([1, 0]) = 0.
    torch.testing.assert_close(negative_entropy(_t([[0.5, 0.5], [1.0, 0.0]])), torch.tensor(-math.log(2) / 2))


def test_eq28_image_objective_by_hand():
    total = image_objective(
        torch.tensor(3.0), torch.tensor(1.0), torch.tensor(2.0), torch.tensor(-0.5), (1.0, 1.0, 0.5, 0.05)
    )
    torch.testing.assert_close(total, torch.tensor(3.0 + 1.0 + 1.0 - 0.025))


def test_eq30_image_score_by_hand():
    # z̃_crm = [2, 0] (not unit): cos to t̃0 = 1, to t̃1 = 0 -> σ(−1).
    score = image_score(_t([[2, 0]]), _t([[[1, 0], [0, 1]]]))
    torch.testing.assert_close(score, torch.sigmoid(torch.tensor([-1.0])))


def test_eq31_32_patch_margins_by_hand():
    text = _t([[[1, 0], [0, 1]]])
    patches = _t([[[[0.6, 0.8], [1, 0]], [[0, 1], [0.8, 0.6]]]])  # (B=1, n=2, N=2, E=2)
    margins = patch_margins(patches, text)
    torch.testing.assert_close(margins, _t([[[0.2, -1.0], [1.0, -0.2]]]))
    torch.testing.assert_close(fused_margins(_t([[0.75, 0.25]]), margins), _t([[0.4, -0.8]]))


def test_eq33_calibration_by_hand():
    # cos0 = 0.6, cos1 = 0.8. Anomalous: [0.5 − 0.2]_+ = 0.3; normal (mirrored): [0.5 + 0.2]_+ = 0.7.
    v = _t([[3, 0], [3, 0]])
    text = _t([[[0.6, 0.8], [0.8, 0.6]]] * 2)
    torch.testing.assert_close(calibration_loss(v, text, torch.tensor([1, 0]), 0.5), torch.tensor(0.5))
    torch.testing.assert_close(calibration_loss(v[:1], text[:1], torch.tensor([1]), 0.2), torch.tensor(0.0))


def test_ortho_warmup_factor():
    assert warmup_factor(5, 10) == 0.5 and warmup_factor(20, 10) == 1.0 and warmup_factor(3, 0) == 1.0


# ------------------------------------------------------------------------------------ inference
def test_identical_branches_reduce_to_the_single_branch_model():
    """With the same CSR weights in every branch, z̃_crm = z̃_g whatever α (Eq. 22): the three-branch
    model must then score and map exactly like the single-branch one (Eq. 30-32)."""
    three, one = _model(), _model(branches=("g",))
    with torch.no_grad():
        for layer3, layer1 in zip(three.csr, one.csr, strict=True):
            for branch in layer3.modules_per_branch:
                branch.load_state_dict(layer1.modules_per_branch[0].state_dict())
            layer3.theta.copy_(layer1.theta)
        for r3, r1 in zip(three.text_refiners, one.text_refiners, strict=True):
            r3.load_state_dict(r1.state_dict())
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    a, b = three.predict(images, class_names="cow"), one.predict(images, class_names="cow")
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    np.testing.assert_allclose(a.maps, b.maps, atol=1e-5)


def test_single_branch_scores_and_maps_follow_eq30_31():
    m = _model(branches=("g",))
    assert m.crm is None and len(m.csr[0].modules_per_branch) == 1
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = m.forward_batch(x, ["cow", "boat"], None)
        scores, maps = out.scores, out.maps
        feats = m.encode_branches(x[None])
        text = m.frozen_text(["cow", "boat"])
    cos = compatibility(feats.cls, text)[:, 0]  # (B, 2)
    torch.testing.assert_close(scores, torch.sigmoid(cos[:, 1] - cos[:, 0]))
    margins = patch_margins(feats.patches, text)[:, 0].reshape(2, 1, *m.backbone.grid)
    expected = torch.nn.functional.interpolate(margins, size=(SIZE, SIZE), mode="bilinear")[:, 0]
    torch.testing.assert_close(maps, expected)


def test_text_cache_follows_the_text_parameters(model):
    before = model.frozen_text(["cow"]).clone()
    torch.testing.assert_close(model.frozen_text(["cow"]), before)
    with torch.no_grad():
        model.text_refiners[0].module.up.weight.mul_(3.0)
    after = model.frozen_text(["cow"])
    with torch.no_grad():
        model.text_refiners[0].module.up.weight.div_(3.0)
    assert differ(after, before)


# ------------------------------------------------------------------------------------ training
def _batch(has_subject: list[bool], labels: list[int]) -> ContextBatch:
    b = len(labels)
    g = torch.Generator().manual_seed(0)
    subject = torch.zeros(b, SIZE, SIZE)
    subject[:, 16:48, 16:48] = 1.0
    return ContextBatch(
        images=torch.randn(b, 3, SIZE, SIZE, generator=g),
        masks=torch.zeros(b, SIZE, SIZE),
        labels=torch.tensor(labels),
        has_mask=torch.ones(b, dtype=torch.bool),
        class_names=["cow"] * b,
        subject_masks=subject if any(has_subject) else None,
        has_subject=torch.tensor(has_subject),
    )


def test_training_views_follow_the_subject_masks(model):
    batch = _batch([True, False], [0, 1])
    views, valid, ids = model.training_views(batch)
    assert ids == [0, 1, 2] and views.shape == (3, 2, 3, SIZE, SIZE)
    torch.testing.assert_close(valid, torch.tensor([[True, False], [True, False], [True, True]]))
    x, m = batch.images[0], batch.subject_masks[0]
    torch.testing.assert_close(views[0, 0], x * m)  # Eq. 10, "zero" fill
    torch.testing.assert_close(views[1, 0], x * (1 - m))
    torch.testing.assert_close(views[2, 0], x)
    for k in range(3):  # no subject mask: every branch sees the image
        torch.testing.assert_close(views[k, 1], batch.images[1])
    views, valid, ids = model.training_views(_batch([False, False], [0, 1]))
    assert ids == [2] and views.shape[0] == 1 and bool(valid.all())


def test_black_mask_fill_is_black_pixels():
    m = _model(mask_fill="black")
    views, _, _ = m.training_views(_batch([True], [1]))
    black = (torch.zeros(3) - torch.tensor(m.backbone.mean)) / torch.tensor(m.backbone.std)
    torch.testing.assert_close(views[0, 0, :, 0, 0], black)  # corner pixel is context: masked in x_s


def _grads(m: CoReCLIP, batch: TrainBatch, loss_fn) -> dict[str, bool]:
    m.zero_grad(set_to_none=True)
    out = loss_fn(batch)
    out["loss"].backward()
    grads = {
        name: p.grad is not None and bool(p.grad.abs().sum() > 0)
        for name, p in m.named_parameters()
        if p.requires_grad
    }
    m.zero_grad(set_to_none=True)
    return grads


def test_image_loss_trains_every_branch_and_the_crm(model):
    grads = _grads(model, _batch([True, True], [0, 1]), model.image_stage_loss)
    for k in range(3):
        assert grads[f"csr.0.modules_per_branch.{k}.down.weight"]
    assert grads["csr.0.theta"] and grads["crm.w_q.weight"] and grads["crm.w_k.weight"]
    assert not any(v for k, v in grads.items() if k.startswith("text_refiners"))


def test_image_loss_without_subject_masks_trains_only_the_global_branch(model):
    batch = _batch([False, False], [0, 1])
    out = model.image_stage_loss(batch)
    assert float(out["fuse_ce"]) == 0.0 and float(out["fuse_ent"]) == 0.0
    grads = _grads(model, batch, model.image_stage_loss)
    assert grads["csr.0.modules_per_branch.2.down.weight"]
    assert not grads["csr.0.modules_per_branch.0.down.weight"]
    assert not grads["csr.0.modules_per_branch.1.down.weight"]
    assert not grads["crm.w_q.weight"]


def test_text_loss_trains_only_the_text_refiners(model):
    grads = _grads(model, _batch([True, True], [0, 1]), model.text_stage_loss)
    assert grads["text_refiners.0.theta"] and grads["text_refiners.0.module.down.weight"]
    assert not any(v for k, v in grads.items() if not k.startswith("text_refiners"))


def test_stage_settings_follow_table7():
    text, image = _model().training_stages()
    assert (text.name, text.config.epochs, text.config.batch_size, text.config.lr) == ("text", 5, 16, 2e-5)
    assert (image.name, image.config.epochs, image.config.batch_size, image.config.lr) == (
        "image",
        20,
        8,
        3e-4,
    )
    assert text.config.betas == image.config.betas == (0.5, 0.999)
    assert image.config.schedule == "multistep" and image.config.milestones == (16000, 32000)
    assert image.config.gamma == 0.5
    model = _model()
    model.schedule = override_schedule(model.schedule, {"image.lr": 5e-5, "image.schedule": "cosine"})
    image = model.training_stages()[1]
    assert image.config.lr == 5e-5 and image.config.schedule == "cosine"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"branches": ("s", "x")}, "branches"),
        ({"branches": ()}, "branches"),
        ({"fusion": "concat"}, "fusion"),
        ({"branches": ("s", "c"), "ground_source": "global"}, "global branch"),
        ({"prompt_set": "nope"}, "prompt_set"),
        ({"fuse_cons_space": "probs"}, "fuse_cons_space"),
        ({"ortho_warmup": 2.0}, "ortho_warmup"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        _model(**options)


def test_ortho_warmup_follows_the_engine_progress():
    """λ_ortho ramps over the first 40 % of the text stage's optimiser steps (B.4: 30–50 %)."""
    m = _model()
    assert m.config.ortho_warmup == 0.4
    data = balanced_subset(al.data.load("synthetic:contextual?size=64&n=4", split="train"), 1, seed=0)  # 10
    history = m.fit(data, stages=["text"], epochs=1, batch_size=2, progress=False)
    # Five steps at stage fractions 0, 0.2, 0.4, 0.6, 0.8: factors 0, 0.5, 1, 1, 1 (mean 0.7).
    assert history["text"][0]["ortho_warmup"] == pytest.approx(0.7)
    assert not any("seen" in k for k in m.trainable_state())  # no hidden counter in the model


def test_text_loss_outside_training_applies_the_full_ortho_weight(model):
    out = model.text_stage_loss(_batch([True, True], [0, 1]))
    assert float(out["ortho_warmup"]) == 1.0


def test_eq25_compares_cosines_by_default(model):
    """Eq. (25) on S = [cos0, cos1] (the paper's reading); the scaled form is s² times larger."""
    assert model.config.fuse_cons_space == "cosine"
    batch = _batch([True, True], [0, 1])
    on_cosines = model.image_stage_loss(batch)["fuse_cons"]
    scaled = _model(fuse_cons_space="logits")
    scaled.load_state_dict(model.state_dict())
    on_logits = scaled.image_stage_loss(batch)["fuse_cons"]
    assert float(on_cosines) > 0
    torch.testing.assert_close(on_logits, on_cosines * model.logit_scale**2, rtol=1e-3, atol=0.0)


def test_grounding_uses_the_plain_clip_class_token(model):
    """v_cls of L_ground (Eq. 16) is the unadapted CLIP CLS, not a branch with random CSR adapters."""
    assert model.config.ground_source == "clip"
    images = _batch([True, True], [0, 1]).images
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.backbone.encode_image(images).cls, dim=-1)
    torch.testing.assert_close(model.visual_class_token(images), expected)


def test_missing_subject_masks_warn_in_three_branch_mode():
    data = al.data.load("synthetic:defects?size=64&n=2", split="train", classes=["disc"])
    with pytest.warns(UserWarning, match="branches=\\('g',\\)"):
        _model().fit(data, stages=["image"], epochs=1, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _model(branches=("g",)).fit(data, stages=["image"], epochs=1, progress=False)
    assert not [w for w in caught if "branches=" in str(w.message)]


# ------------------------------------------------------------------------------------ learning
def _class_mean_auroc(method: CoReCLIP, dataset) -> float:
    """Image AUROC per subject class, averaged over classes (the paper's Table 13)."""
    samples = list(dataset)
    pred = method.predict(np.stack([s.image for s in samples]), class_names=[s.class_name for s in samples])
    labels, names = dataset.labels, np.array([s.class_name for s in samples])
    return float(
        np.mean([al.metrics.image_auroc(labels[names == c], pred.scores[names == c]) for c in set(names)])
    )


def test_learns_unseen_subject_context_pairs(tmp_path, monkeypatch):
    """N-shot training on the SS pairs of `synthetic:contextual` lifts image AUROC on its CC pairs (every
    subject-context combination unseen in training)."""
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))
    source = f"synthetic:contextual?n=8&size={SIZE}&test=cc"
    train = al.data.load(source, split="train")
    cc = al.data.load(source, split="test")
    assert {dict(r.meta)["split"] for r in cc.records} == {"CC"}
    m = _model()
    before = _class_mean_auroc(m, cc)
    m.fit(
        balanced_subset(train, 8, seed=0),
        seed=0,
        progress=False,
        **{"text.lr": 1e-3, "image.lr": 1e-2, "image.epochs": 60},
    )
    after = _class_mean_auroc(m, cc)
    # Measured: 0.50 -> 0.71 (seed 0); training seeds 1 and 2 give 0.67 and 0.66, so a bar at 0.60 stays well
    # below the spread that any change of rounding (another CPU, fused kernels) could cause. With 30 epochs
    # the spread over seeds was 0.61-0.69, too close to a meaningful bar.
    assert after >= 0.6 and after >= before + 0.1, (before, after)


# ---------------------------------------------------------------------- modules
def _set(linear: nn.Linear, weight: list, bias: list | None = None) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))
        if bias is not None:
            linear.bias.copy_(torch.tensor(bias))


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
