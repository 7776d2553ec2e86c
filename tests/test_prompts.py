"""Prompt sets: sizes, exact wording against the papers' lists, the description table, anchor maths."""

from __future__ import annotations

import math

import pytest
import torch

from anomalens import prompts as P


def test_class_word_normalises_folder_names():
    assert P.class_word("Metal_Nut") == "metal nut"
    assert P.class_word(" pipe__fryum ") == "pipe fryum"
    assert P.class_word("bottle") == "bottle"


def test_winclip_set_sizes_and_wording():
    assert len(P.WINCLIP_TEMPLATES) == 22 and len(set(P.WINCLIP_TEMPLATES)) == 22
    assert all(t.count("{}") == 1 for t in P.WINCLIP_TEMPLATES)
    normal, anomalous = P.winclip_prompts("metal_nut")
    assert (len(normal), len(anomalous)) == (7 * 22, 5 * 22)
    assert normal[0] == "a cropped photo of the metal nut."
    # Examples printed in InCTRLv2 Table 1 (paper 001), which uses the WinCLIP ensemble.
    assert "a photo of a flawless metal nut for visual inspection." in normal
    assert "a blurry photo of the metal nut without defect." in normal
    assert "a jpeg corrupted photo of a metal nut with defect." in anomalous
    assert "a photo of a broken metal nut." in anomalous
    assert not set(normal) & set(anomalous)


def test_inctrl_set_has_four_anomalous_states_without_broken():
    normal, anomalous = P.inctrl_prompts("bottle")
    assert (len(normal), len(anomalous)) == (7 * 22, 4 * 22)
    assert not any("broken" in s for s in anomalous)
    assert normal == P.winclip_prompts("bottle")[0]
    # State-major order, as the official code builds it.
    assert anomalous[:2] == ["a cropped photo of the damaged bottle.", "a cropped photo of a damaged bottle."]
    assert anomalous[22] == "a cropped photo of the bottle with flaw."


def test_aa_clip_prompts_use_the_class_description():
    normal, anomalous = P.aa_clip_prompts("bottle")
    assert normal == [
        "dark bottle.",
        "a photo of dark bottle.",
        "a dark bottle.",
        "a photo of a dark bottle.",
        "the dark bottle.",
        "a photo of the dark bottle.",
    ]
    assert len(anomalous) == 10
    assert anomalous[:2] == ["a damaged dark bottle.", "a photo of a damaged dark bottle."]
    assert anomalous[-1] == "a photo of a dark bottle with damage."


def test_class_description_lookup():
    assert P.class_description("metal_nut") == "metal nut which has four notched edges"
    assert P.class_description("pcb1", dataset="VisA") == "dual ultrasonic distance sensor pcb module"
    assert P.class_description("Kvasir") == "colon endoscopy image"  # case-insensitive
    # Restricted to a dataset that lacks the class, or unknown everywhere: the plain name.
    assert P.class_description("bottle", dataset="visa") == "bottle"
    assert P.class_description("My_Widget") == "my widget"
    assert P.aa_clip_prompts("My_Widget")[0][0] == "my widget."


def test_description_table_has_no_class_in_two_datasets():
    seen: dict[str, str] = {}
    for dataset, table in P._description_table().items():
        for name in table:
            assert name not in seen, f"{name} in {seen.get(name)} and {dataset}"
            seen[name] = dataset
    assert {"mvtec", "visa", "mpdd", "btad"} <= set(P._description_table())
    assert len(P._description_table()["mvtec"]) == 15 and len(P._description_table()["visa"]) == 12


def test_core_clip_prompts_compose_context_sentences_with_templates():
    normal, anomalous = P.core_clip_prompts("traffic_cone")
    assert (len(normal), len(anomalous)) == (4 * 3, 4 * 3)
    assert normal[:3] == [
        "a photo of traffic cone in a normal place.",
        "a photo of a photo of traffic cone in a normal place.",
        "an image of a photo of traffic cone in a normal place.",
    ]
    assert "a traffic cone in an unsafe context." in anomalous
    assert "an image of an unusual photo of traffic cone." in anomalous


def test_core_clip_prompts_accept_another_state_set():
    normal, anomalous = P.core_clip_prompts("bottle", context=P.CORE_CLIP_DEFECT)
    assert (len(normal), len(anomalous)) == (7 * 3, 5 * 3)
    assert "an image of broken bottle." in anomalous


def test_object_agnostic_words():
    assert (P.OBJECT_AGNOSTIC_NORMAL, P.OBJECT_AGNOSTIC_ANOMALOUS) == ("object", "damaged object")


def test_ensemble_text_features_normalises_before_and_after_the_mean():
    table = {"a": [3.0, 4.0], "b": [0.0, 2.0]}

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.tensor([table[t] for t in texts])

    anchor = P.ensemble_text_features(encode, ["a", "b"])
    # [3,4]/5 = [0.6, 0.8]; [0,2]/2 = [0, 1]; mean [0.3, 0.9]; norm sqrt(0.9).
    expected = torch.tensor([0.3, 0.9]) / math.sqrt(0.9)
    torch.testing.assert_close(anchor, expected)
    # Averaging raw embeddings would give [1.5, 3]/|.| = [0.447, 0.894]: the per-prompt norm matters.
    assert not torch.allclose(anchor, torch.tensor([1.5, 3.0]) / math.sqrt(11.25), atol=1e-3)
    with pytest.raises(ValueError):
        P.ensemble_text_features(encode, [])
