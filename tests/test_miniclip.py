"""The anomalens-mini pre-training data (data/captions.py), its trainer and the transfer dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalens.data import captions as C


def test_class_table_splits_are_disjoint_and_named_once():
    names = [c.name for c in C.CLASSES]
    assert len(names) == len(set(names))
    groups = {split: set(C.class_names(split)) for split in C.SPLITS}
    assert all(groups.values())
    assert not groups["pretrain"] & (groups["train"] | groups["heldout"])
    assert not groups["train"] & groups["heldout"]
    with pytest.raises(ValueError, match="class split"):
        C.class_names("test")


def test_sample_pairs_is_deterministic_and_seed_dependent():
    classes = C.class_names("pretrain")
    a = C.sample_pairs(3, 5, 8, 32, classes)
    b = C.sample_pairs(3, 5, 8, 32, classes)
    c = C.sample_pairs(3, 6, 8, 32, classes)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert np.array_equal(a.match, b.match) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)


def test_pairs_differ_exactly_inside_the_defect_mask():
    pairs = C.sample_pairs(0, 0, 16, 32, C.class_names("pretrain"))
    assert pairs.images.shape == (16, 32, 32, 3) and pairs.images.dtype == np.uint8
    clean, defective, mask = pairs.images[0::2], pairs.images[1::2], pairs.masks[1::2]
    diff = np.abs(clean.astype(int) - defective.astype(int)).max(axis=-1)  # (8, S, S)
    assert (diff[~mask] == 0).all()
    assert (diff[mask] >= C.MIN_CONTRAST).all()
    assert (mask.mean(axis=(1, 2)) >= C.MIN_DEFECT_AREA).all()
    assert not pairs.masks[0::2].any()
    assert pairs.match.diagonal().all()


def test_every_defect_type_draws_on_every_class():
    rng = np.random.default_rng(0)
    for spec in C.CLASSES:
        scene = C.render_scene(spec, 32, int(rng.integers(0, 2**63)))
        for kind in C.DEFECT_TYPES:
            image, mask, drawn = C.draw_defect(spec, scene, kind, rng)
            assert drawn in (kind, "stain") and mask.any() and image.shape == (32, 32, 3)


def test_captions_never_name_classes_outside_pretraining():
    unseen = set(C.class_names("train") + C.class_names("heldout"))
    assert not unseen & set(C._random_words())
    words = set()
    for index in range(4):
        for text in C.sample_pairs(0, index, 32, 32, C.class_names("pretrain")).captions:
            words |= set(text.rstrip(".").split())
    assert not unseen & words


def test_caption_keys_match_images():
    assert C._matches(("wood", "scratch"), ("*", "anomalous"))
    assert C._matches(("wood", "scratch"), ("wood", "scratch"))
    assert not C._matches(("wood", "good"), ("wood", "anomalous"))
    assert not C._matches(("wood", "scratch"), ("carpet", "scratch"))
    assert not C._matches(("wood", "scratch"), ("*", "hole"))


def test_transfer_dataset_lists_unseen_classes_only(tmp_path, monkeypatch):
    from anomalens import data

    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path))
    test = data.load("synthetic:transfer?n=2&size=32", "test", ["gear", "star"])
    assert {r.class_name for r in test.records} == {"gear", "star"}
    assert sorted(r.label for r in test.records) == [0, 0, 0, 0, 1, 1, 1, 1]
    sample = test[[r.label for r in test.records].index(1)]
    assert sample.mask is not None and sample.mask.any()
    with pytest.raises(data.DataError, match="unknown class"):
        data.load("synthetic:transfer?n=2&size=32", "test", ["wood"])  # a pre-training class


def test_pretraining_is_bit_reproducible(tmp_path):
    from safetensors.torch import load_file

    from anomalens.backbones.pretrain import pretrain_mini

    threads = torch.get_num_threads()
    runs = [
        load_file(pretrain_mini(tmp_path / str(i), steps=2, batch_size=4, warmup=1, log=lambda _: None))
        for i in range(2)
    ]
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(v.dtype == torch.float16 for v in runs[0].values())


def test_mini_config_is_registered_with_its_native_grid():
    from anomalens.backbones import load_clip
    from anomalens.backbones.registry import MINI, list_backbones

    backbone = load_clip(MINI, None)
    assert MINI in list_backbones()
    assert backbone.image_size == 48 and tuple(backbone.grid) == (6, 6)
    params = sum(p.numel() for p in backbone.model.parameters())
    assert 2e6 < params < 5e6  # fp16 file ≤ 10 MB


def test_packaged_weights_resolve_without_network(tmp_path, monkeypatch):
    from anomalens.backbones import registry

    key = (registry.MINI, registry.MINI)
    monkeypatch.setitem(registry.PACKAGED_WEIGHTS, key, tmp_path / "absent.safetensors")
    with pytest.raises(registry.WeightsUnavailableError, match="packaged weights"):
        registry.resolve_pretrained(registry.MINI, registry.MINI)
    present = tmp_path / "present.safetensors"
    present.write_bytes(b"x")
    monkeypatch.setitem(registry.PACKAGED_WEIGHTS, key, present)
    assert registry.resolve_pretrained(registry.MINI, registry.MINI) == str(present)


def test_packaged_weights_load_by_name_and_align_text_with_defects():
    """The shipped weights load with pretrained="anomalens-mini" and, on a held-out class never seen in
    pre-training, put defective images closer to "damaged" than normal images (global embedding)."""
    import torch.nn.functional as F

    from anomalens.backbones import load_clip
    from anomalens.backbones.registry import MINI
    from anomalens.metrics import image_auroc
    from anomalens.prompts import ensemble_text_features, winclip_prompts

    backbone = load_clip(MINI, MINI)
    rng = np.random.default_rng(0)
    spec, images, labels = C.BY_NAME["honeycomb"], [], []
    for i in range(16):
        scene = C.render_scene(spec, 48, int(rng.integers(0, 2**63)))
        images.append(np.rint(np.clip(scene.image, 0, 255)).astype(np.uint8))
        defect = C.render_scene(spec, 48, int(rng.integers(0, 2**63)))
        images.append(C.draw_defect(spec, defect, C.DEFECT_TYPES[i % len(C.DEFECT_TYPES)], rng)[0])
        labels += [0, 1]
    with torch.no_grad():
        features = F.normalize(backbone.encode_image(backbone.preprocess(np.stack(images))).cls, dim=-1)
        anchors = torch.stack(
            [
                ensemble_text_features(lambda p: backbone.encode_text(backbone.tokenize(p)), side)
                for side in winclip_prompts("honeycomb")
            ]
        )
    scores = (features @ anchors.T).softmax(-1)[:, 1].numpy()
    assert image_auroc(labels, scores) > 0.7  # about 0.9 measured on other draws; random weights about 0.5
