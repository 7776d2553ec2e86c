"""Crane: equations on hand-checked tensors, the ablation switches, training, converter and learning."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomalens as al
from anomalens.backbones import load_clip
from anomalens.backbones.attention import dattn_weights, eattn_weights, resample_grid
from anomalens.backbones.registry import WeightsUnavailableError
from anomalens.converters.crane import convert
from anomalens.methods.crane import (
    CONFIGURATIONS,
    Crane,
    anomaly_map,
    insert_context_token,
    pixel_losses,
    score_based_pooling,
)
from anomalens.metrics import image_auroc, pixel_auroc
from anomalens.ops import anchor_logits, anchor_probability
from helpers import differ

SIZE = 64
TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": SIZE}
PLUS = {**CONFIGURATIONS["crane+"], "dino": "test-tiny-dino"}


@pytest.fixture(scope="module")
def backbone():
    return load_clip("test-tiny", None, image_size=SIZE, pos_interp="bilinear")


@pytest.fixture(scope="module")
def make(backbone):
    """Build a Crane on the shared tiny backbone (no reload), seeded prompts."""

    def build(**options) -> Crane:
        torch.manual_seed(0)
        return Crane(Crane.make_config(image_size=SIZE, **options), backbone).eval()

    return build


@pytest.fixture(scope="module")
def images(backbone):
    rng = np.random.default_rng(0)
    return backbone.preprocess(list(rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)))


# ---------------------------------------------------------------------- equations
def test_eattn_weights_sum_of_self_correlations():
    """§3.1 W = A(Q) + A(K) + A(V), A(E) = softmax(E Eᵀ·s), by hand for N = 2, d = 1, s = 1."""
    q = torch.tensor([[1.0], [0.0]]).view(1, 1, 2, 1)
    k = torch.tensor([[0.0], [2.0]]).view(1, 1, 2, 1)
    v = torch.tensor([[1.0], [1.0]]).view(1, 1, 2, 1)
    s = 1 / (1 + math.e)  # softmax([1, 0])[1]
    e4 = 1 / (1 + math.exp(4))  # softmax([0, 4])[0]
    expected = torch.tensor([[1 - s + 0.5 + 0.5, s + 0.5 + 0.5], [0.5 + e4 + 0.5, 0.5 + 1 - e4 + 0.5]])
    w = eattn_weights(q, k, v, scale=1.0)[0, 0]
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(dim=-1), torch.tensor([3.0, 3.0]))  # a sum, not a mean
    qq_kk = eattn_weights(q, k, v, scale=1.0, variant="qq+kk")[0, 0]
    torch.testing.assert_close(qq_kk[0], torch.tensor([1 - s + 0.5, s + 0.5]))


def test_dattn_masking_by_hand():
    """§3.1 D-Attn: (S − 1.2·mean S)·3, entries < ε masked to −∞, softmax over the last axis."""
    sim = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.1], [0.0, 0.1, 1.0]])[None]  # mean 4.8/9
    w = dattn_weights(sim)[0, 0]
    p = 1 / (1 + math.exp(-0.6))  # softmax([1.08, 0.48])[0]; (0 − 0.64)·3 < 0 is masked
    expected = torch.tensor([[p, 1 - p, 0.0], [1 - p, p, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(w, expected)
    assert dattn_weights(sim, eps=0.5)[0, 0, 0].tolist() == [1.0, 0.0, 0.0]  # 0.48 < ε = 0.5 masked too


def test_dattn_mean_per_image_vs_batch():
    # Image mean 5/9: 1.2·mean = 2/3 masks 0.6 and 0.4; with the other image (mean 0) they are kept.
    sim = torch.tensor([[1.0, 0.6, 0.0], [0.6, 1.0, 0.4], [0.0, 0.4, 1.0]])[None]
    other = torch.full((1, 3, 3), -0.5) + 1.5 * torch.eye(3)[None]
    both = torch.cat([sim, other])
    torch.testing.assert_close(dattn_weights(both)[0], dattn_weights(sim)[0])
    assert dattn_weights(sim)[0, 0, 1].tolist() == [0.0, 1.0, 0.0]
    assert differ(dattn_weights(both, mean="batch")[0], dattn_weights(sim)[0])


def test_similarity_logits_eq1():
    """Eq. (1): [⟨e, g_n⟩, ⟨e, g_a⟩] / τ, as Crane calls the shared op (scale 1/τ)."""
    text = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    torch.testing.assert_close(
        anchor_logits(torch.tensor([[1.0, 0.0]]), text, 1.0 / 0.5), torch.tensor([[2.0, 1.2]])
    )
    patches = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    torch.testing.assert_close(anchor_logits(patches, text, 1.0), torch.tensor([[[0.0, 0.8], [1.0, 0.6]]]))


def test_anomaly_map_soft_mean_vs_mean_logits():
    """§4: mean of branch softmaxes (soft_mean) or softmax of mean logits; a 1×1 grid gives constants."""
    logits = [torch.tensor([[[0.0, 2.0]]]), torch.tensor([[[0.0, 0.0]]])]
    soft = anomaly_map(logits, (1, 1), 2, soft_mean=True)
    hard = anomaly_map(logits, (1, 1), 2, soft_mean=False)
    torch.testing.assert_close(soft, torch.full((1, 2, 2), (1 / (1 + math.exp(-2)) + 0.5) / 2))
    torch.testing.assert_close(hard, torch.full((1, 2, 2), 1 / (1 + math.exp(-1))))


def test_score_based_pooling_by_hand():
    """§3.2 official: g_a = normalize(Σ p̄ Z̄), g⁺ = normalize(½g_a + ½g_i); paper: per-branch means."""
    z = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])]
    logits = [torch.tensor([[[0.0, 0.0], [0.0, math.log(3)]]])] * 2  # p_a = 0.5, 0.75
    g_i = torch.tensor([[0.0, 1.0]])
    g_a = F.normalize(torch.tensor([0.875, 0.375]), dim=0)  # 0.5·[1, 0] + 0.75·[0.5, 0.5]
    torch.testing.assert_close(
        score_based_pooling(z, logits, g_i)[0], F.normalize(0.5 * g_a + 0.5 * g_i[0], dim=0)
    )
    paper = score_based_pooling(z, logits, g_i, mode="paper")[0]  # branches [0.4, 0.6] and [1, 0]
    torch.testing.assert_close(paper, F.normalize(torch.tensor([0.35, 0.65]), dim=0))
    assert score_based_pooling(z, logits, g_i, mode="none") is g_i


def test_insert_context_token_moves_eot():
    embeddings = torch.arange(12.0).view(2, 6, 1)
    tokens = torch.tensor([[49406, 10, 11, 49407, 0, 0], [49406, 10, 12, 13, 49407, 0]])
    out, ids = insert_context_token(embeddings, tokens, torch.tensor([[-1.0], [-2.0]]), [2, 3])
    assert out.shape == (2, 2, 6, 1)
    assert out[1, 0, :, 0].tolist() == [0, 1, -2, 2, 3, 4]
    assert out[0, 1, :, 0].tolist() == [6, 7, 8, -1, 9, 10]
    assert ids.tolist() == [[49406, 10, 11, 11, 49407, 0], [49406, 10, 12, 13, 13, 49407]]
    assert ids.argmax(dim=-1).tolist() == [4, 5]  # EOT moved by one


def test_pixel_losses_by_hand():
    """§3.3 L_local: focal on [p_n, p_a] + Dice((1 − p_n + p_a)/2, mask)."""
    logits = torch.tensor([[[0.0, math.log(4)]]])  # p = [0.2, 0.8]
    focal, dice = pixel_losses(logits, torch.ones(1, 2, 2), (1, 1), "nearest")
    assert dice.item() == pytest.approx(1 - (2 * 3.2 + 1) / (3.2 + 4 + 1), rel=1e-5)
    pt = 0.8 * (1 - 1e-5) + 0.2 * 1e-5 + 1e-5
    assert focal.item() == pytest.approx((1 - pt) ** 2 * -math.log(pt), rel=1e-4)


def test_resample_grid_bilinear():
    tokens = torch.tensor([[[0.0], [1.0]]])  # 1×2 grid
    out = resample_grid(tokens, (1, 2), (1, 4))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert resample_grid(tokens, (1, 2), (1, 2)) is tokens


# ---------------------------------------------------------------------- method structure and switches
def test_layers_and_prompt_parameters_follow_the_backbone(make):
    m = make()
    assert m.layers == [1, 2, 3, 4] and m.eattn_start == 1  # 6/12/18/24 and 6 of 24 on 4 blocks
    assert m.deep_layers == [2, 3]  # text layers 2..9 of 12 on 4 layers
    assert m.ctx_normal.shape == m.ctx_anomalous.shape == (12, 64)
    assert [tuple(p.shape) for p in m.deep_prompts] == [(4, 64), (4, 64)]
    assert set(m.trainable_state()) == {"ctx_normal", "ctx_anomalous", "deep_prompts.0", "deep_prompts.1"}


def test_branches_of_each_configuration(make, images):
    crane = make().visual_features(images)
    assert len(crane.branches) == 4 and crane.grid == (4, 4)
    plus = make(**PLUS).visual_features(images)
    assert len(plus.branches) == 2 and plus.grid == (5, 5)  # D-Attn then E-Attn, on the DINO grid
    dattn_only = make(**PLUS, use_eattn=False).visual_features(images)
    assert len(dattn_only.branches) == 1
    torch.testing.assert_close(dattn_only.branches[0], plus.branches[0])
    for v in (crane, plus):
        torch.testing.assert_close(v.global_embedding.norm(dim=-1), torch.ones(3))
        assert all(torch.allclose(z.norm(dim=-1), torch.ones(())) for z in v.branches)
    with pytest.raises(ValueError, match="use_eattn"):
        make(use_eattn=False)


def test_eattn_taps_snapshots_and_official_aliasing(make, images):
    snapshots = make().visual_features(images).branches
    assert differ(snapshots[0], snapshots[-1])
    aliased = make(official_compat=True).visual_features(images).branches
    for z in aliased:
        torch.testing.assert_close(z, snapshots[-1])


def test_attention_variants_are_distinct(make, images):
    """Table 3.c: qq, kk, vv, qq+kk and their sum give different E-Attn features."""
    feats = {
        v: make(attn_variant=v, layers=(24,)).visual_features(images).branches[0]
        for v in ("qkv", "qq", "kk", "vv", "qq+kk")
    }
    names = sorted(feats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert differ(feats[a], feats[b]), (a, b)
    torch.testing.assert_close(
        make(attn_variant="qq+kk+vv", layers=(24,)).visual_features(images).branches[0], feats["qkv"]
    )
    with pytest.raises(ValueError, match="attn_variant"):
        make(attn_variant="qk")


def test_dattn_official_compat_is_batch_dependent(make, images):
    ours, compat = make(**PLUS), make(**PLUS, official_compat=True)
    batch = ours.visual_features(images).branches[0]
    alone = ours.visual_features(images[:1]).branches[0]
    torch.testing.assert_close(alone[0], batch[0], atol=1e-5, rtol=1e-5)
    compat_batch = compat.visual_features(images).branches[0]
    compat_alone = compat.visual_features(images[:1]).branches[0]
    assert differ(compat_alone[0], compat_batch[0])
    assert differ(compat_alone[0], alone[0])  # mid-block values


def test_score_pooling_switch(make, images):
    """Table 3.a: without pooling the image score is p_a(g_i)."""
    m = make(score_pooling="none")
    scores = m.forward_batch(images, ["object"] * 3, None).scores
    with torch.no_grad():
        g_i = m.visual_features(images).global_embedding
        expected = anchor_probability(g_i, m.text_features(None), 1.0 / 0.07)
    torch.testing.assert_close(scores, expected)
    official = make().forward_batch(images, ["object"] * 3, None).scores
    paper = make(score_pooling="paper").forward_batch(images, ["object"] * 3, None).scores
    assert differ(official, scores) and differ(paper, official)


def test_soft_mean_switch_changes_maps(make, images):
    soft = make().forward_batch(images, ["object"] * 3, None).maps
    hard = make(soft_mean=False).forward_batch(images, ["object"] * 3, None).maps
    assert soft.shape == (3, SIZE, SIZE) and differ(soft, hard)


def test_image_context_in_prompts(make, images):
    m = make()
    with torch.no_grad():
        g_i = m.visual_features(images).global_embedding
        static, conditioned = m.text_features(None), m.text_features(g_i)
        after_name = make(context_position="after_name").text_features(g_i)
    assert static.shape == (1, 2, 64) and conditioned.shape == (3, 2, 64)
    assert differ(conditioned[0], conditioned[1])
    assert differ(conditioned, after_name)
    off = m.forward_batch(images, ["object"] * 3, None).scores
    on = make(context_at_test=True).forward_batch(images, ["object"] * 3, None).scores
    assert differ(off, on)


def test_learned_prompt_text_is_encoded_once_until_the_prompts_change(make, images, monkeypatch):
    m = make(score_pooling="none")  # image score p_a(g_i): checkable against the uncached text
    calls = []
    encode = m.backbone.encode_text
    monkeypatch.setattr(m.backbone, "encode_text", lambda *a, **k: calls.append(1) or encode(*a, **k))

    def uncached_scores() -> torch.Tensor:
        with torch.no_grad():
            g_i = m.visual_features(images).global_embedding
            return anchor_probability(g_i, m.text_features(None), 1.0 / 0.07)

    first = [m.forward_batch(images, [c] * 3, None).scores for c in ("object", "disc", "object")]
    assert len(calls) == 1  # one encoding serves every call and class: the prompts are object-agnostic
    torch.testing.assert_close(first[0], uncached_scores())
    torch.testing.assert_close(first[1], first[0])
    # A training step changes the prompts: the next call encodes them again and uses the new ones.
    stage = m.training_stages()[0]
    optimizer = torch.optim.SGD(stage.parameters(), lr=10.0)
    stage.loss(_batch(m)[0])["loss"].backward()
    optimizer.step()
    calls.clear()
    after = m.forward_batch(images, ["object"] * 3, None).scores
    assert len(calls) == 1 and differ(after, first[0])
    torch.testing.assert_close(after, uncached_scores())


# ---------------------------------------------------------------------- training
def _batch(method: Crane, n: int = 4):
    ds = al.data.load("synthetic:defects?size=48&n=2&seed=5", split="test", classes=["disc"])
    return method.collate([ds[i] for i in range(n)], augment=False), ds


def test_training_loss_updates_only_prompts(make):
    m = make(**PLUS).train()
    batch, _ = _batch(m)
    out = m.training_loss(batch)
    assert set(out) == {"loss", "focal", "dice", "ce"}
    expected = 2 * out["focal"] + 2 * out["dice"] + 0.2 * out["ce"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.prompt_parameters())
    assert all(p.grad is None for p in [*m.backbone.parameters(), *m.dino.parameters()])


def test_training_without_masks_uses_image_loss_only(make):
    m = make().train()
    batch, _ = _batch(m)
    batch.has_mask[:] = False
    out = m.training_loss(batch)
    assert out["focal"].item() == out["dice"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.2 * out["ce"].item(), rel=1e-6)


def test_collate_resizes_masks_bilinearly(make):
    m = make()
    batch, ds = _batch(m)
    masks = [ds[i].mask if ds[i].mask is not None else np.zeros((48, 48), bool) for i in range(4)]
    assert any(ds[i].mask is not None for i in range(4))
    torch.testing.assert_close(batch.masks, m.backbone.preprocess_masks(masks, mode="bilinear"))
    assert batch.has_mask.all()


def test_missing_dino_weights_fail_fast(tmp_path, monkeypatch):
    for var in ("ANOMALENS_CACHE", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="dino_pretrained=.*use_dattn=False"):
        al.create("crane", use_dattn=True, **TINY)
    assert time.perf_counter() - start < 10


def test_save_load_round_trip_with_dattn(make, images, tmp_path):
    m = al.create("crane", **PLUS, **TINY)
    with torch.no_grad():
        for p in m.prompt_parameters():
            p.add_(0.05 * torch.randn_like(p))
    loaded = al.load(m.save(tmp_path / "plus.anomalens"), device="cpu")
    assert loaded.config == m.config and loaded.dino is not None
    a, b = (model.forward_batch(images, ["object"] * 3, None) for model in (m, loaded))
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.maps, b.maps)


# ---------------------------------------------------------------------- converter
def _official_state(method: Crane) -> dict[str, torch.Tensor]:
    """A checkpoint in the official layout holding ``method``'s prompts (plus derived buffers)."""
    width = method.backbone.text_width
    state = {
        "ctx_pos": method.ctx_normal.detach()[None, None].clone(),
        "ctx_neg": method.ctx_anomalous.detach()[None, None].clone(),
        "token_prefix_pos": torch.zeros(1, 1, 1, width),
        "tokenized_prompts_pos": method.prompt_tokens[0].int().view(1, 1, -1),
        "tokenized_prompts_neg": method.prompt_tokens[1].int().view(1, 1, -1),
    }
    state.update(
        {f"compound_prompts_text.{i}": p.detach().clone() for i, p in enumerate(method.deep_prompts)}
    )
    return state


def test_converter_maps_official_layout(make, images, tmp_path):
    source = make()
    with torch.no_grad():
        for p in source.prompt_parameters():
            p.copy_(torch.randn_like(p))
    torch.save({"prompt_learner": _official_state(source)}, tmp_path / "epoch_5.pth")
    converted = convert(tmp_path / "epoch_5.pth", **TINY)
    for a, b in zip(converted.prompt_parameters(), source.prompt_parameters(), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        converted.forward_batch(images, ["object"] * 3, None).scores,
        source.forward_batch(images, ["object"] * 3, None).scores,
    )
    plus = convert(tmp_path / "epoch_5.pth", configuration="crane+", dino="test-tiny-dino", **TINY)
    assert plus.config.use_dattn and plus.layers == [4]


def test_converter_errors_name_the_problem(make, tmp_path):
    state = _official_state(make())
    del state["compound_prompts_text.1"]
    torch.save({"prompt_learner": state}, tmp_path / "fewer.pth")
    with pytest.raises(ValueError, match="deep prompt layers"):
        convert(tmp_path / "fewer.pth", **TINY)
    state = _official_state(make())
    state["tokenized_prompts_neg"] = state["tokenized_prompts_pos"]
    torch.save({"prompt_learner": state}, tmp_path / "words.pth")
    with pytest.raises(ValueError, match="tokenized_prompts_neg"):
        convert(tmp_path / "words.pth", **TINY)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an official Crane checkpoint"):
        convert(tmp_path / "other.pth", **TINY)
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "missing.pth", **TINY)


# ---------------------------------------------------------------------- learning
def _evaluate(method: Crane, dataset) -> tuple[float, float]:
    samples = [dataset[i] for i in range(len(dataset))]
    pred = method.predict(np.stack([s.image for s in samples]))
    masks = np.stack([s.mask if s.mask is not None else np.zeros((SIZE, SIZE), bool) for s in samples])
    return image_auroc([s.label for s in samples], pred.scores), pixel_auroc(masks, pred.maps)


def test_learning_zero_shot_protocol_on_synthetic_defects():
    """Train on one set's test split, evaluate on another seed's (the zero-shot protocol)."""
    train = al.data.load("synthetic:defects?size=64&n=16&seed=0", split="test", classes=["grain"])
    test = al.data.load("synthetic:defects?size=64&n=16&seed=1", split="test", classes=["grain"])
    torch.manual_seed(0)
    m = al.create("crane", **TINY)
    image_before, pixel_before = _evaluate(m, test)
    history = m.fit(train, epochs=5, lr=1e-2, progress=False)
    image_after, pixel_after = _evaluate(m, test)
    assert history["prompts"][-1]["loss"] < history["prompts"][0]["loss"]
    assert image_after > max(0.75, image_before + 0.15), (image_before, image_after)
    assert pixel_after > max(0.75, pixel_before + 0.15), (pixel_before, pixel_after)
