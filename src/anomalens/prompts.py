"""Text prompt sets of the implemented methods, written down as data, and the anchor construction.

Every set is compositional (WinCLIP, Jeong et al. CVPR 2023): a *state* phrase holds the class word
(``"damaged {}"``), a *template* holds the state (``"a photo of the {}."``), and the prompts of one side
are all template x state combinations, state-major (the order the official InCTRL and AA-CLIP code
uses; the anchor is a mean, so the order only matters for float rounding). The anchor of a side is the
re-normalised mean of the L2-normalised prompt embeddings (`ensemble_text_features`).

Sets: `WINCLIP` (7 normal / 5 anomalous states x 22 templates), `INCTRL` (InCTRL v1 official code: the
WinCLIP set without "broken {}"), `AA_CLIP` (AA-CLIP supplement Table 5, filled with a class description
from ``resources/class_descriptions.json``), `CORE_CLIP_CONTEXT` (CoRe-CLIP App. B.3) and the
object-agnostic words of AnomalyCLIP used by Crane.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PromptSet:
    """Normal and anomalous state phrases x formatting templates; each state and template has one ``{}``."""

    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]

    def build(self, word: str) -> tuple[list[str], list[str]]:
        """(normal, anomalous) prompts: ``template.format(state.format(word))``, state-major."""
        return self._expand(self.normal_states, word), self._expand(self.anomalous_states, word)

    def _expand(self, states: Sequence[str], word: str) -> list[str]:
        return [template.format(state.format(word)) for state in states for template in self.templates]


# WinCLIP's template-level prompts (its supplementary list; the same 22 are in InCTRL's official code).
WINCLIP_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of a {}.",
    "a dark photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for anomaly detection.",
    "a photo of the {} for anomaly detection.",
)
WINCLIP_NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
WINCLIP_ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

WINCLIP = PromptSet(WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES)
# InCTRL v1 (OFFICIAL_CODE_NOTES §3): 4 anomalous states, no "broken {}".
INCTRL = PromptSet(
    WINCLIP_NORMAL_STATES,
    tuple(s for s in WINCLIP_ANOMALOUS_STATES if s != "broken {}"),
    WINCLIP_TEMPLATES,
)
# AA-CLIP supplement Table 5; "{}" holds a class description, not the folder name.
AA_CLIP = PromptSet(
    normal_states=("{}", "a {}", "the {}"),
    anomalous_states=(
        "a damaged {}",
        "a broken {}",
        "a {} with flaw",
        "a {} with defect",
        "a {} with damage",
    ),
    templates=("{}.", "a photo of {}."),
)
# CoRe-CLIP App. B.3: context sentences composed with the formatting templates ("cls" -> "{}").
CORE_CLIP_CONTEXT = PromptSet(
    normal_states=(
        "a photo of {} in a normal place",
        "a {} in a typical environment",
        "a {} in a safe context",
        "a usual photo of {}",
    ),
    anomalous_states=(
        "a {} in an unusual place",
        "a {} in an abnormal environment",
        "a {} in an unsafe context",
        "an unusual photo of {}",
    ),
    templates=("{}.", "a photo of {}.", "an image of {}."),
)
# For structural-defect benchmarks (MVTec AD, VisA), where B.3 gives no separate list: WinCLIP's
# states with B.3's formatting templates (our choice, docs/methods/core-clip.md).
CORE_CLIP_DEFECT = PromptSet(WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, CORE_CLIP_CONTEXT.templates)

# AnomalyCLIP's object-agnostic words, used by Crane after its learnable context (Crane appends ".").
OBJECT_AGNOSTIC_NORMAL = "object"
OBJECT_AGNOSTIC_ANOMALOUS = "damaged object"


def class_word(class_name: str) -> str:
    """Folder-style class name -> prompt word: ``"Metal_Nut"`` -> ``"metal nut"``."""
    return " ".join(class_name.replace("_", " ").lower().split())


@functools.cache
def _description_table() -> dict[str, dict[str, str]]:
    """{dataset: {class name (lower case): description}} from resources/class_descriptions.json."""
    text = resources.files("anomalens").joinpath("resources/class_descriptions.json").read_text("utf-8")
    datasets = json.loads(text)["datasets"]
    return {ds.lower(): {c.lower(): d for c, d in table.items()} for ds, table in datasets.items()}


def class_description(class_name: str, dataset: str | None = None) -> str:
    """AA-CLIP's hand-written description of a class, or `class_word` for a class not in the table.

    The table (resources/class_descriptions.json) covers MVTec AD, VisA, MPDD, BTAD and the medical sets
    of AA-CLIP; no class name occurs in two of them, so ``dataset`` is only needed to restrict the lookup.
    Matching is case-insensitive.
    """
    table = _description_table()
    key = class_name.lower()
    if dataset is not None:
        return table.get(dataset.lower(), {}).get(key, class_word(class_name))
    for descriptions in table.values():
        if key in descriptions:
            return descriptions[key]
    return class_word(class_name)


def winclip_prompts(class_name: str) -> tuple[list[str], list[str]]:
    """WinCLIP compositional prompt ensemble: 7x22 normal and 5x22 anomalous prompts."""
    return WINCLIP.build(class_word(class_name))


def inctrl_prompts(class_name: str) -> tuple[list[str], list[str]]:
    """InCTRL v1 prompts (official code): 7x22 normal and 4x22 anomalous prompts."""
    return INCTRL.build(class_word(class_name))


def aa_clip_prompts(class_name: str, dataset: str | None = None) -> tuple[list[str], list[str]]:
    """AA-CLIP prompts (supplement Table 5): 3x2 normal and 5x2 anomalous, on `class_description`."""
    return AA_CLIP.build(class_description(class_name, dataset))


def core_clip_prompts(class_name: str, context: PromptSet | None = None) -> tuple[list[str], list[str]]:
    """CoRe-CLIP prompts (App. B.3): 4 context sentences x 3 formatting templates per side.

    ``context`` replaces the B.3 context sentences and templates, e.g. `CORE_CLIP_DEFECT` for the
    MVTec AD / VisA single-branch mode; None means `CORE_CLIP_CONTEXT`.
    """
    return (CORE_CLIP_CONTEXT if context is None else context).build(class_word(class_name))


def ensemble_text_features(encode: Callable[[list[str]], torch.Tensor], prompts: list[str]) -> torch.Tensor:
    """Prompt-ensemble anchor: L2-normalise each embedding, average, re-normalise -> (D,).

    ``encode`` maps P prompts to their (P, D) text embeddings.
    """
    if not prompts:
        raise ValueError("ensemble_text_features needs at least one prompt")
    embeddings = F.normalize(encode(prompts), dim=-1)  # (P, D)
    return F.normalize(embeddings.mean(dim=0), dim=-1)
