"""InCTRL v1 and InCTRLv2: each equation on a hand-checked tensor, the method-level behaviours (support
cache, batch invariance with K > 1, training data), the official-checkpoint converter, and learning on
`synthetic:defects` with the random `test-tiny` backbone."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anomalens as al
from anomalens.converters.inctrl import convert, map_official_state
from anomalens.data import DataError
from anomalens.methods.inctrl import (
    InCTRL,
    InCTRLAdapter,
    InCTRLv2,
    ScoreHead,
    dasl_subset,
    generalist_score,
    holistic_score,
    image_residual,
    inference_map,
    multi_layer_residual_map,
    oasl_subset,
    official_batch_layout,
    patch_residual_maps,
    pixel_map,
    prototype,
    semantic_layer_maps,
    semantic_maps,
    v1_prompts,
)
from anomalens.metrics import image_auroc, pixel_auroc
from anomalens.ops import anchor_probability

SIZE = 64
TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": SIZE}
DEFECTS = f"synthetic:defects?size={SIZE}&n=16"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine two threads wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(name: str, **options) -> InCTRL | InCTRLv2:
    torch.manual_seed(0)
    return al.create(name, **{**TINY, **options})


def _images(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------- equations
def test_eq1_prototype_is_the_mean_of_adapted_supports():
    adapted = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [2.0, 0.0, 1.0]]])  # (1, K=3, E=3)
    torch.testing.assert_close(prototype(adapted), torch.tensor([[2.0, 2.0, 3.0]]))


def test_eq2_image_residual_paper_and_official_sign():
    query, proto = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 3.0]])
    torch.testing.assert_close(
        image_residual(query, proto, prototype_minus_query=False), torch.tensor([[0.5, -1.0]])
    )
    torch.testing.assert_close(
        image_residual(query, proto, prototype_minus_query=True), torch.tensor([[-0.5, 1.0]])
    )


def test_eq3_patch_residual_nearest_support_patch_by_hand():
    # One layer, two query patches, two support patches (from two support images), unit 2-d vectors.
    queries = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # (B=1, L=1, N=2, D=2)
    memory = torch.tensor([[[[1.0, 0.0], [0.6, 0.8]]]])  # (G=1, L=1, R=2, D=2)
    # cos(q1, ·) = [1, 0.6] -> 0.5·(1 − 1) = 0; cos(q2, ·) = [0, 0.8] -> 0.5·(1 − 0.8) = 0.1.
    expected = torch.tensor([[[0.0, 0.1]]])
    torch.testing.assert_close(patch_residual_maps(queries, memory, 0.5), expected)
    torch.testing.assert_close(patch_residual_maps(queries, memory, 0.5, chunk_elements=1), expected)
    torch.testing.assert_close(patch_residual_maps(queries, memory, 1.0), 2 * expected)  # paper's 1 − cos


def test_eq3_matches_a_loop_for_shared_and_per_query_memory_with_chunking():
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(3, 2, 5, 4, generator=g), dim=-1)  # (B, L, N, D)
    for groups in (1, 3):
        memory = F.normalize(torch.randn(groups, 2, 7, 4, generator=g), dim=-1)  # (G, L, K·N, D)
        loop = torch.empty(3, 2, 5)
        for b in range(3):
            for layer in range(2):
                for n in range(5):
                    cos = memory[b % groups, layer] @ queries[b, layer, n]
                    loop[b, layer, n] = min(0.5 * (1 - c) for c in cos.tolist())
        for chunk in (1, 13, 10**6):  # 1 and 13 elements split the queries into several blocks
            torch.testing.assert_close(patch_residual_maps(queries, memory, 0.5, chunk), loop)
    with pytest.raises(ValueError, match="support memory for 2 queries"):
        patch_residual_maps(queries, memory[:2], 0.5)


def test_eq3_stays_fp32_under_autocast():
    g = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(2, 3, 6, 8, generator=g), dim=-1)
    memory = F.normalize(queries[:1, :, :4] + 0.01 * torch.randn(1, 3, 4, 8, generator=g), dim=-1)
    expected = patch_residual_maps(queries, memory, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = patch_residual_maps(queries, memory, 0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_eq4_residual_map_is_the_mean_over_layers():
    layer_maps = torch.tensor([[[0.2, 0.4], [0.4, 0.0], [0.0, 0.2]]])  # (B=1, L=3, N=2)
    torch.testing.assert_close(multi_layer_residual_map(layer_maps), torch.tensor([[0.2, 0.2]]))


def test_eq6_semantic_score_softmax_over_normal_and_anomalous():
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B, 2, E): F_n = e1, F_a = e2
    features = torch.tensor([[3.0, 0.0]])  # normalised to e1: cos = [1, 0]
    expected = torch.tensor([1.0 / (1.0 + math.e)])  # softmax([1, 0])[a]
    torch.testing.assert_close(anchor_probability(F.normalize(features, dim=-1), anchors, 1.0), expected)
    # A scale of 2 sharpens it: softmax([2, 0])[a].
    torch.testing.assert_close(
        anchor_probability(F.normalize(features, dim=-1), anchors, 2.0), torch.tensor([1 / (1 + math.e**2)])
    )


def test_eq7_per_layer_patch_maps_by_hand():
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # Layer 1: patch 1 along F_a, patch 2 along F_n; layer 2: both at 45°.
    features = torch.tensor([[[[0.0, 2.0], [5.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # (B=1, L=2, N=2, E=2)
    maps = semantic_layer_maps(features, anchors, 2.0)  # (B, L, 2, N)
    high, low = math.e**2 / (1 + math.e**2), 1 / (1 + math.e**2)
    torch.testing.assert_close(maps[0, 0, 1], torch.tensor([high, low]))  # S^1_a
    torch.testing.assert_close(maps[0, 0, 0], torch.tensor([low, high]))  # S^1_n
    torch.testing.assert_close(maps[0, 1], torch.full((2, 2), 0.5))


def test_eq8_semantic_maps_average_the_layers():
    layer_maps = torch.tensor([[[[0.8, 0.6], [0.2, 0.4]], [[0.4, 0.2], [0.6, 0.8]]]])  # (1, L=2, 2, N=2)
    torch.testing.assert_close(semantic_maps(layer_maps), torch.tensor([[[0.6, 0.4], [0.4, 0.6]]]))


def test_eq9_final_score_by_hand():
    s_i, s_a = torch.tensor([0.6, 0.2]), torch.tensor([0.2, 0.4])
    residual = torch.tensor([[0.1, 0.3], [0.5, 0.0]])
    # (1 − 0.5)·(0.6 + 0.2)/2 + 0.5·0.3 = 0.35 ; 0.5·0.3 + 0.5·0.5 = 0.4
    torch.testing.assert_close(generalist_score(s_i, s_a, residual, 0.5), torch.tensor([0.35, 0.4]))
    # α = 0: the holistic part only; α = 1: the patch maximum only.
    torch.testing.assert_close(generalist_score(s_i, s_a, residual, 0.0), torch.tensor([0.4, 0.3]))
    torch.testing.assert_close(generalist_score(s_i, s_a, residual, 1.0), torch.tensor([0.3, 0.5]))


def test_eq11_pixel_map_averages_residual_and_semantic_maps():
    torch.testing.assert_close(
        pixel_map(torch.tensor([[0.2, 0.0]]), torch.tensor([[0.6, 0.4]])), torch.tensor([[0.4, 0.2]])
    )


def test_eq14_oasl_maps_use_their_own_projection():
    model = _build("inctrlv2", logit_scale=1.0)
    n_layers, width, embed = len(model.layers), model.backbone.width, model.backbone.embed_dim
    assert n_layers == 3  # blocks 7, 9, 11 of 12 -> 2, 3, 4 of test-tiny
    e1, e2 = torch.eye(embed)[0], torch.eye(embed)[1]
    anchors = torch.stack([e1, e2])[None]  # (1, 2, E): F_n = e1, F_a = e2
    with torch.no_grad():  # φ₂(F^l) = bias_l for every patch: e2, e1, e2 over the three layers
        for linear, direction in zip(model.oasl_projection.linears, (e2, e1, e2), strict=True):
            linear.weight.zero_()
            linear.bias.copy_(direction)
        for linear in model.dasl_projection.linears:  # φ₁ points elsewhere
            linear.weight.zero_()
            linear.bias.copy_(e1)
    tokens = torch.randn(1, n_layers, 4, width)
    oasl = model.semantic(model.oasl_projection, tokens, anchors)  # (1, 2, N)
    # Per layer softmax([cos_n, cos_a])_a = σ(1), σ(−1), σ(1); Eq. 15 averages them.
    sig = 1 / (1 + math.e**-1)
    expected_a = (sig + (1 - sig) + sig) / 3
    torch.testing.assert_close(oasl[0, 1], torch.full((4,), expected_a))
    torch.testing.assert_close(oasl[0, 0], torch.full((4,), 1 - expected_a))
    dasl = model.semantic(model.dasl_projection, tokens, anchors)
    torch.testing.assert_close(dasl[0, 1], torch.full((4,), 1 - sig))


def test_eq17_inference_map_blends_dasl_and_oasl_maps():
    m_p, m_n = torch.tensor([[0.8, 0.0]]), torch.tensor([[0.4, 0.4]])
    torch.testing.assert_close(inference_map(m_p, m_n, 0.75), torch.tensor([[0.5, 0.3]]))
    torch.testing.assert_close(inference_map(m_p, m_n, 0.0), m_p)


class _MeanHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1)


def test_v1_holistic_score_official_formula():
    s_t, s_i = torch.tensor([0.1]), torch.tensor([0.2])
    residual = torch.tensor([[0.1, 0.5]])
    # H = 0.1 + 0.2 + [0.1, 0.5] = [0.4, 0.8]; η_h(H) = mean = 0.6; final = (0.6 + max 0.5) / 2.
    torch.testing.assert_close(holistic_score(s_t, s_i, residual, _MeanHead()), torch.tensor([0.55]))


def test_official_batch_layout_reproduces_the_regrouping():
    b, k, n_layers, n = 2, 2, 3, 1
    cls = torch.tensor([[[0.0], [1.0]], [[10.0], [11.0]]])  # value 10·query + shot
    # Official order of the support batch is shot-major (s·B + q): 0, 10, 1, 11, regrouped in pairs.
    tokens = (10 * torch.arange(b)[:, None, None] + torch.arange(k)[None, :, None]).float()  # (B, K, 1)
    support_tokens = tokens[:, :, None, None, :].expand(b, k, n_layers, n, 1) + 100 * torch.arange(
        n_layers
    ).view(1, 1, n_layers, 1, 1)
    queries = (
        (10 * torch.arange(b)[:, None] + torch.arange(n_layers)[None, :]).float().view(b, n_layers, 1, 1)
    )
    q, c, memory = official_batch_layout(queries, cls, support_tokens)
    torch.testing.assert_close(c[:, :, 0], torch.tensor([[0.0, 10.0], [1.0, 11.0]]))
    # Query tokens: the (layer, batch) stack read as (batch, layer): (l0,q0), (l0,q1), (l1,q0) | (l1,q1), ...
    torch.testing.assert_close(q.flatten(), torch.tensor([0.0, 10.0, 1.0, 11.0, 2.0, 12.0]))
    # Support memory: query 0's "layer 0" holds layer-0 tokens of (q0,s0), (q1,s0); its "layer 1" those of
    # (q0,s1), (q1,s1); its "layer 2" layer-1 tokens of (q0,s0), (q1,s0).
    torch.testing.assert_close(memory[0, :, :, 0], torch.tensor([[0.0, 10.0], [1.0, 11.0], [100.0, 110.0]]))
    # One query: nothing moves.
    q1, c1, m1 = official_batch_layout(queries[:1], cls[:1], support_tokens[:1])
    torch.testing.assert_close(q1, queries[:1])
    torch.testing.assert_close(c1, cls[:1])
    torch.testing.assert_close(m1, support_tokens[:1].transpose(1, 2).flatten(2, 3))


def test_v1_prompts_match_the_official_sets():
    normal, anomalous = v1_prompts("metal_nut")
    assert (len(normal), len(anomalous)) == (7 * 22, 4 * 22)
    assert "a cropped photo of the flawless metal nut." in normal
    assert not any("broken" in p for p in anomalous)
    assert v1_prompts("bird") == (
        ["a photo of bird for anomaly detection."],
        ["a photo without bird for anomaly detection."],
    )


# ---------------------------------------------------------------------- method behaviour
def test_image_size_defaults_follow_the_paper():
    assert InCTRL.image_size(InCTRL.make_config(), "ViT-B-16-plus-240") is None  # native 240
    assert InCTRLv2.image_size(InCTRLv2.make_config(), "ViT-L-14") == 518
    assert InCTRL.image_size(InCTRL.make_config(image_size=96), "ViT-L-14") == 96


@pytest.mark.parametrize("name", ["inctrl", "inctrlv2"])
def test_batch_invariant_with_several_supports_and_chunked_search(name):
    model = _build(name)
    images, support = _images(5, 1), _images(3, 2)  # K = 3
    batch = model.predict(images, "weave", support=support)
    tiny_chunks = _build(name, nn_chunk_mb=0).predict(images, "weave", support=support)  # 1-element blocks
    for i in range(len(images)):
        alone = model.predict(images[i : i + 1], "weave", support=support)
        np.testing.assert_allclose(alone.scores, batch.scores[i : i + 1], atol=1e-5)
        np.testing.assert_allclose(alone.maps, batch.maps[i : i + 1], atol=1e-5)
    np.testing.assert_allclose(tiny_chunks.scores, batch.scores, atol=1e-5)
    np.testing.assert_allclose(tiny_chunks.maps, batch.maps, atol=1e-5)


def test_support_features_are_computed_once_per_support_set(monkeypatch):
    model = _build("inctrl")
    calls = []
    original = model.prepare_support
    monkeypatch.setattr(model, "prepare_support", lambda x: calls.append(x.shape) or original(x))
    support = _images(2, 3)
    for seed in (4, 5):
        model.predict(_images(2, seed), support=support)
    assert calls == [(2, 3, SIZE, SIZE)]
    model.predict(_images(1, 6), support=_images(2, 7))
    assert len(calls) == 2


def test_patch_residuals_vanish_for_a_query_in_its_own_support():
    model = _build("inctrlv2")
    images = _images(2, 8)
    x = model.backbone.preprocess(list(images), resize=model.resize)
    out = model.components(x, ["grain"] * 2, model.prepare_support(x))
    assert out.residual_map.abs().max() < 1e-5  # each patch's nearest support patch is itself
    other = model.components(x, ["grain"] * 2, model.prepare_support(x[:1]))
    assert other.residual_map[1].max() > 1e-3


def test_official_compat_flips_the_residual_and_batches_like_the_official_code():
    model, compat = _build("inctrl"), _build("inctrl", official_compat=True)
    with torch.no_grad():  # identical weights except η_ref's first layer, negated (what `convert` does)
        compat.load_state_dict(model.state_dict())
        compat.ref_head.linears[0].weight.neg_()
    images, support = _images(3, 9), _images(2, 10)
    ours = model.predict(images, support=support)
    single = [compat.predict(images[i : i + 1], support=support).scores[0] for i in range(3)]
    np.testing.assert_allclose(single, ours.scores, atol=1e-6)
    batched = compat.predict(images, support=support).scores
    assert np.abs(batched - ours.scores).max() > 1e-5  # the official regrouping mixes the batch


def test_converter_maps_official_keys(tmp_path: Path):
    source = _build("inctrl")
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        for bn in source.ref_head.norms:
            bn.running_mean.uniform_(-0.2, 0.2)
    official = {"visual.conv1.weight": torch.zeros(1), "logit_scale": torch.zeros(())}  # ignored
    official["adapter.fc.0.weight"] = source.adapter.fc[0].weight.detach().clone()
    official["adapter.fc.2.weight"] = source.adapter.fc[2].weight.detach().clone()
    for theirs, ours in (("diff_head_ref", source.ref_head), ("diff_head", source.holistic_head)):
        for i, module in enumerate((ours.linears[0], ours.linears[1], ours.out), start=1):
            official[f"{theirs}.projection{i}.weight"] = module.weight.detach().clone()
            official[f"{theirs}.projection{i}.bias"] = module.bias.detach().clone()
        for i, bn in enumerate(ours.norms, start=2):
            for key, value in bn.state_dict().items():
                official[f"{theirs}.bn{i}.{key}"] = value.clone()
        official[f"{theirs}.bn1.weight"] = torch.ones(3)  # unused by the official forward
    # The official sign is prototype − query: flip η_ref's first layer so that outputs agree.
    official["diff_head_ref.projection1.weight"] = -official["diff_head_ref.projection1.weight"]
    path = tmp_path / "checkpoint_10.pyth"
    torch.save({"model_state": official}, path)
    converted = convert(path, **TINY)
    images, support = _images(2, 11), _images(2, 12)
    np.testing.assert_allclose(
        converted.predict(images, support=support).scores,
        source.predict(images, support=support).scores,
        atol=1e-6,
    )
    compat = convert(path, official_compat=True, **TINY)
    torch.testing.assert_close(
        compat.ref_head.linears[0].weight, official["diff_head_ref.projection1.weight"]
    )
    assert "ref_head.norms.0.running_mean" in map_official_state(official, negate_residual=True)

    with pytest.raises(ValueError, match="does not fit inctrl"):
        convert(path, **{**TINY, "image_size": 96})  # η_h would need 36 inputs, the file has 16
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="not an official InCTRL checkpoint"):
        convert(tmp_path / "clip.pt", **TINY)


# ---------------------------------------------------------------------- training data
@pytest.fixture(scope="module")
def defects_all():
    return al.data.load(DEFECTS, split="all", classes=["weave", "grain", "carpet"])


def test_stage_data_selection(defects_all):
    test_part = dasl_subset(defects_all)
    assert {dict(r.meta)["set"] for r in test_part.records} == {"test"}
    assert set(test_part.labels) == {0, 1}
    normals = oasl_subset(defects_all)
    assert {dict(r.meta)["set"] for r in normals.records} == {"train"} and not normals.labels.any()
    test_only = al.data.load(DEFECTS, split="test", classes=["weave"])
    assert len(dasl_subset(test_only)) == len(test_only)
    assert len(oasl_subset(test_only)) == int((test_only.labels == 0).sum())  # no train split: all normals


def test_stages_parameters_and_collated_supports(defects_all):
    model = _build("inctrlv2")
    dasl, oasl = model.training_stages()
    assert (dasl.name, oasl.name) == ("dasl", "oasl")
    phi2 = {id(p) for p in model.oasl_projection.parameters()}
    assert phi2.isdisjoint(id(p) for p in dasl.parameters())
    assert {id(p) for p in oasl.parameters()} == phi2

    with pytest.raises(RuntimeError, match="fit"):
        dasl.collate([defects_all[0]], False)
    dasl.support(defects_all)
    data = dasl.select(defects_all)
    samples = [data[i] for i in range(0, len(data), 12)]
    torch.manual_seed(0)
    batch = dasl.collate(samples, False)
    assert batch.support.shape == (len(samples), 2, 3, SIZE, SIZE)
    pool = {}
    for r in defects_all.records:
        if r.label == 0:
            image = al.data.decode_record(r).image
            pool[r.path] = (r.class_name, model.backbone.preprocess([image], resize=model.resize)[0])
    for sample, support in zip(samples, batch.support, strict=True):
        for image in support:
            match = [path for path, (_, x) in pool.items() if torch.equal(x, image)]
            assert len(match) == 1 and match[0] != sample.path and pool[match[0]][0] == sample.class_name
    torch.manual_seed(0)
    assert torch.equal(dasl.collate(samples, False).support, batch.support)

    big = _build("inctrlv2", train_shots=40).training_stages()[0]
    big.support(defects_all)
    with pytest.raises(DataError, match="train_shots=40"):
        big.select(defects_all)


def test_v1_trains_on_balanced_batches_like_the_official_sampler():
    """Official `BalancedBatchSampler`: every batch 8 normal + 8 anomalous, 100 steps per epoch."""
    config = _build("inctrl").training_stages()[0].config
    assert (config.sampler, config.batch_size, config.max_steps_per_epoch) == ("balanced", 16, 100)
    assert (config.optimizer, config.lr, config.epochs, config.amp) == ("adamw", 1e-3, 10, False)


def test_support_pool_does_not_depend_on_the_query_split(defects_all):
    """Supports come from train/good + test/good (the official normal list) even when the queries are
    the test split: 20 supports per query need more normals than the test split's 16."""
    test_only = al.data.load(DEFECTS, split="test", classes=["weave"])
    stage = _build("inctrl", train_shots=20).training_stages()[0]
    stage.support(test_only)
    with pytest.raises(DataError, match="train_shots=20"):
        stage.select(test_only)
    stage.support(defects_all)
    data = stage.select(test_only)
    batch = stage.collate([data[0], data[len(data) - 1]], False)
    assert batch.support.shape[:2] == (2, 20)


def test_losses_reach_only_their_stage_parameters(defects_all):
    model = _build("inctrlv2")
    dasl, oasl = model.training_stages()
    dasl.support(defects_all)
    data = dasl.select(defects_all)
    batch = dasl.collate([data[i] for i in range(0, len(data), 10)], False)
    model.train()
    for stage, learns, frozen in (
        (dasl, [model.adapter, model.ref_head, model.dasl_projection], model.oasl_projection),
        (oasl, [model.oasl_projection], model.dasl_projection),
    ):
        model.zero_grad()
        out = stage.loss(batch)
        assert torch.isfinite(out["loss"]) and {"focal", "dice"} <= set(out)
        out["loss"].backward()
        for module in learns:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        assert all(p.grad is None for p in frozen.parameters())
    v1 = _build("inctrl")
    stage = v1.training_stages()[0]
    stage.support(defects_all)
    stage.select(defects_all)
    v1.train()
    out = stage.loss(batch)
    out["loss"].backward()
    assert all(p.grad is not None for p in v1.holistic_head.parameters())
    one = dataclasses.replace(
        batch,
        images=batch.images[:1],
        masks=batch.masks[:1],
        labels=batch.labels[:1],
        has_mask=batch.has_mask[:1],
        class_names=batch.class_names[:1],
        support=batch.support[:1],
    )
    assert stage.loss(one)["loss"].item() == 0.0  # batch-norm heads cannot use a batch of one


def test_v1_trains_in_float64(defects_all):
    """A model converted with ``.double()`` computes and learns in float64 end to end (the three-step
    parity with the official code needs it: tests/test_parity_inctrl_steps.py)."""
    model = _build("inctrl").double()
    stage = model.training_stages()[0]
    stage.support(defects_all)
    data = stage.select(defects_all)
    batch = stage.collate([data[i] for i in range(0, len(data), 10)], False)
    batch = dataclasses.replace(batch, images=batch.images.double(), support=batch.support.double())
    model.train()
    out = stage.loss(batch)
    assert out["loss"].dtype == torch.float64
    out["loss"].backward()
    assert all(p.grad.dtype == torch.float64 for p in model.holistic_head.parameters())


def test_generalist_protocol_records_supports():
    from anomalens.protocols import run_protocol

    model = _build("inctrlv2")
    spec = f"synthetic:defects?size={SIZE}&n=4"
    result = run_protocol("generalist", model, spec, shots=[1, 2], seeds=2, progress=False)
    assert set(result["datasets"]) == {f"synthetic:defects/{k}-shot" for k in (1, 2)}
    files = result["support_files"]
    for k in (1, 2):
        draws = files[f"synthetic:defects/{k}-shot"]
        assert set(draws) == {"0", "1"} and all(len(draws[s]["tile"]) == k for s in draws)


# ---------------------------------------------------------------------- learning
TRAIN_CLASSES = ["weave", "grain", "carpet"]
HELD_OUT = ["disc", "tile"]


def _few_shot_eval(model, data: al.data.Dataset, support: al.data.Dataset) -> dict[str, float]:
    """Per-class K=2 few-shot image/pixel AUROC of the prediction and of its components, class-averaged."""
    rows = []
    for cls in data.class_names:
        samples = [s for s in data if s.class_name == cls]
        shots = [support[i].image for i in al.data.sample_support(support, 2, 0, cls)]
        labels = np.array([s.label for s in samples])
        masks = np.stack(
            [s.mask if s.mask is not None else np.zeros(s.image.shape[:2], bool) for s in samples]
        )
        pred = model.predict([s.image for s in samples], cls, support=shots)
        x = model.backbone.preprocess([s.image for s in samples], resize=model.resize)
        ctx = model.prepare_support(model.backbone.preprocess(shots, resize=model.resize))
        with torch.no_grad():
            out = model.components(x, [cls] * len(samples), ctx)
        row = {"image": image_auroc(labels, pred.scores), "pixel": pixel_auroc(masks, pred.maps)}
        row["s_i"] = image_auroc(labels, out.s_i.numpy())
        for key in ("dasl", "oasl"):
            if hasattr(out, key):
                grid = getattr(out, key)[:, 1].unflatten(-1, model.backbone.grid)[:, None]
                up = F.interpolate(grid, size=masks.shape[1:], mode="bilinear", align_corners=False)[:, 0]
                row[key] = pixel_auroc(masks, up.numpy())
        rows.append(row)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


@pytest.fixture(scope="module")
def learning_data(defects_all):
    fresh = f"{DEFECTS}&seed=1"  # new images of the training classes
    return {
        "train": defects_all,
        "seen": al.data.load(DEFECTS, split="test", classes=TRAIN_CLASSES),
        "seen_support": al.data.load(DEFECTS, split="train", classes=TRAIN_CLASSES),
        "fresh": al.data.load(fresh, split="test", classes=["weave", "grain"]),
        "fresh_support": al.data.load(fresh, split="train", classes=["weave", "grain"]),
        "held": al.data.load(DEFECTS, split="test", classes=HELD_OUT),
        "held_support": al.data.load(DEFECTS, split="train", classes=HELD_OUT),
    }


def _learning_run(name: str, data: dict) -> tuple[dict, dict, dict]:
    model = _build(name)
    parts = ("seen", "fresh", "held")
    before = {p: _few_shot_eval(model, data[p], data[f"{p}_support"]) for p in parts}
    history = model.fit(
        data["train"], epochs=10, batch_size=8, lr=1e-3, max_steps_per_epoch=None, progress=False, seed=0
    )
    after = {p: _few_shot_eval(model, data[p], data[f"{p}_support"]) for p in parts}
    return before, after, history


def test_inctrl_learns_and_stays_well_above_chance_on_held_out_classes(learning_data):
    before, after, history = _learning_run("inctrl", learning_data)
    losses = [e["loss"] for e in history["main"]]
    assert losses[-1] < losses[0] - 0.03
    # The image-level residual head learns its training queries.
    assert after["seen"]["s_i"] > before["seen"]["s_i"] + 0.15, (before, after)
    # Few-shot on classes never trained on: well above chance. (On random weights the learned heads do
    # not transfer across classes; the patch residuals M_x carry the held-out classes.)
    assert after["held"]["image"] > 0.65 and after["held"]["pixel"] > 0.75, after


def test_inctrlv2_learns_and_stays_well_above_chance_on_held_out_classes(learning_data):
    before, after, history = _learning_run("inctrlv2", learning_data)
    for stage in ("dasl", "oasl"):
        losses = [e["loss"] for e in history[stage]]
        assert losses[-1] < losses[0] - 0.05, (stage, losses)
    # DASL's and OASL's semantic maps segment new images of the training classes far better.
    assert after["fresh"]["dasl"] > before["fresh"]["dasl"] + 0.1, (before, after)
    assert after["fresh"]["oasl"] > before["fresh"]["oasl"] + 0.1, (before, after)
    assert after["seen"]["s_i"] > before["seen"]["s_i"] + 0.1, (before, after)
    assert after["held"]["image"] > 0.7 and after["held"]["pixel"] > 0.6, after


# ---------------------------------------------------------------------- modules
def _set(linear: nn.Linear, weight: list, bias: list | None = None) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))
        if bias is not None:
            linear.bias.copy_(torch.tensor(bias))


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
