"""Backbone names, the package's test configs, layer mapping, preprocessing constants and weight lookup.

`register_clip_configs()` adds the open_clip model configs shipped in ``anomalens/resources``
(``test-tiny``: ViT-B/16 structure at width 64, 4 visual/text layers; ``anomalens-mini``, the CLIP
pre-trained here, see docs/anomalens-mini.md) to open_clip's global table on first
use, not at import, so importing anomalens changes no other library's state; after it
``open_clip.create_model("test-tiny")`` works.
``test-tiny-dino`` is a tiny DINOv2-style timm ViT described by ``resources/test-tiny-dino.json``.

Weights are resolved *before* any model is built, and resolution fails fast: no pretrained CLIP or
DINOv2 weights can be downloaded on CI, so a missing weight file must cost seconds, not a retry loop.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
from open_clip.constants import (
    HF_SAFE_WEIGHTS_NAME,
    HF_WEIGHTS_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
)

# The names live in the torch-free `anomalens.catalog` (read by `anomalens list`); re-exported here.
from anomalens.catalog import (  # noqa: F401
    DEFAULT_DINO,
    MINI,
    PAPER_BACKBONES,
    TEST_TINY,
    TEST_TINY_DINO,
    list_backbones,
)
from anomalens.ops import resolve_device  # noqa: F401  (re-exported by anomalens.backbones)

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
# The anomalens-mini config and weights ship with the package, so pretrained="anomalens-mini" resolves
# to the packaged file (no download, no cache).
PACKAGED_WEIGHTS = {(MINI, MINI): RESOURCES / f"{MINI}.safetensors"}
# The package's random tiny backbone of each family (a method's `backbone_kind`).
TINY_BACKBONES = {"clip": TEST_TINY, "dino": TEST_TINY_DINO}
# Weight file names shared by many HF repositories: never matched on their own in a flat cache folder.
GENERIC_HF_FILES = (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, "model.safetensors", "pytorch_model.bin")
# Seconds allowed for the reachability probe of a weight host.
PROBE_TIMEOUT_S = 2.0
# Words meaning "random initialisation" for `pretrained`.
RANDOM_WORDS = ("", "none", "random")
# Seed of randomly initialised backbones: a method saved with ``pretrained=None`` reloads the same weights.
RANDOM_INIT_SEED = 0
# DINOv2 input normalisation (ImageNet statistics).
DINO_MEAN, DINO_STD = IMAGENET_MEAN, IMAGENET_STD

# open_clip model configs shipped in resources/ (timm configs such as test-tiny-dino are not among them).
CLIP_CONFIGS = (TEST_TINY, MINI)


@functools.cache
def register_clip_configs() -> None:
    """Add the package's open_clip configs (`CLIP_CONFIGS`) to open_clip's model table, once."""
    for name in CLIP_CONFIGS:
        open_clip.add_model_config(RESOURCES / f"{name}.json")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable (no network)."""


def map_layer(i: int, depth: int, ref_depth: int) -> int:
    """Map a 1-based layer index written for a ``ref_depth``-layer backbone onto a ``depth``-layer one.

    ``max(1, round(i · depth / ref_depth))`` with halves rounded up (not Python's banker's rounding),
    clamped to ``depth``. E.g. 6/12/18/24 of ViT-L (24) → 3/6/9/12 on ViT-B (12) → 1/2/3/4 on test-tiny.
    """
    if not 1 <= i <= ref_depth:
        raise ValueError(f"layer {i} outside 1..{ref_depth}")
    return min(depth, max(1, math.floor(i * depth / ref_depth + 0.5)))


def map_layers(indices: Iterable[int], depth: int, ref_depth: int) -> list[int]:
    """`map_layer` over ``indices``; the result is sorted with duplicates removed.

    On a shallow backbone several paper layers can land on the same block (e.g. 7, 9, 11 of 12 → 2, 3, 4
    of 4, but 1, 2 of 24 → 1 of 4); each block is then used once.
    """
    return sorted({map_layer(i, depth, ref_depth) for i in indices})


def is_random(pretrained: str | bool | None) -> bool:
    """True when ``pretrained`` asks for random initialisation (None, False, "", "none", "random")."""
    if pretrained is None or pretrained is False:
        return True
    return isinstance(pretrained, str) and pretrained.strip().lower() in RANDOM_WORDS


def clip_preprocess_constants(
    name: str, pretrained: str | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation (mean, std) of a CLIP backbone: the tag's values when it is an open_clip tag, else
    open_clip's defaults for the architecture (OpenAI statistics for every ViT we use)."""
    cfg = {} if is_random(pretrained) else open_clip.get_pretrained_cfg(name, str(pretrained))
    mean = tuple(cfg.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", OPENAI_DATASET_STD))
    return mean, std


def anomalens_cache() -> Path | None:
    """The directory named by ``ANOMALENS_CACHE``, if set."""
    value = os.environ.get("ANOMALENS_CACHE")
    return Path(value).expanduser() if value else None


def hf_cache_dir() -> Path:
    """Hugging Face hub cache directory, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _hf_cached(repo_id: str, filenames: Iterable[str]) -> str | None:
    """Path of the first of ``filenames`` present in the local HF cache for ``repo_id`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _first_file(directory: Path | None, names: Iterable[str]) -> str | None:
    if directory is None:
        return None
    for name in names:
        path = directory / name
        if path.is_file():
            return str(path)
    return None


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of ``url`` opens within ``timeout`` seconds.

    Always False when ``HF_HUB_OFFLINE`` is set, so offline users never wait for a probe.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)
    # The connect timeout does not bound DNS resolution, which can hang for long on a dead network.
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, port).result(timeout=timeout)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _unavailable(kind: str, name: str, tag: str, looked: list[str], host: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"{kind} weights {name!r} (pretrained={tag!r}) not found locally and {host} is unreachable; "
        f"looked in: {', '.join(looked)}. Supply a local file with pretrained='/path/to/file.pt' "
        f"(CLI: --pretrained /path/to/file.pt), or put the file in $ANOMALENS_CACHE or the HF cache "
        f"(HF_HOME), or use pretrained=None for random weights."
    )


def _hf_repo_matches_tag(hf_hub: str, tag: str) -> bool:
    """False when a ``timm/<arch>.<tag>`` repository names another tag than ``tag``.

    open_clip 3.3 maps ViT-B-16-plus-240 ``laion400m_e32`` to the ``...laion400m_e31`` HF repository;
    those weights are then taken from the tag's URL file instead (InCTRL uses the e32 file).
    """
    repo = hf_hub.rstrip("/").split("/")
    if repo[0] != "timm" or len(repo) < 2 or "." not in repo[1]:
        return True
    return repo[1].rsplit(".", 1)[1] == tag.lower().replace("-", "_")


def _clip_candidates(name: str, tag: str, cfg: dict[str, Any]) -> tuple[list[str], str | None, list[str]]:
    """(flat file names, HF repo id, HF file names) under which a tag's weights may be cached."""
    flat = [f"{name}-{tag}{ext}" for ext in (".safetensors", ".pt", ".pth", ".bin")]
    if cfg.get("url"):
        flat.insert(0, os.path.basename(cfg["url"]))
    repo_id, hf_files = None, []
    if cfg.get("hf_hub") and _hf_repo_matches_tag(cfg["hf_hub"], tag):
        # "org/repo/" means open_clip's default file names; "org/repo/file.bin" names the file.
        repo_id, filename = os.path.split(cfg["hf_hub"])
        if filename:
            hf_files = [filename.rsplit(".", 1)[0] + ".safetensors", filename]
        else:
            hf_files = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        # Generic HF names ("open_clip_model.safetensors") only count under a <repo id>/ folder.
        flat += [f"{repo_id}/{f}" for f in hf_files]
        flat += [f for f in hf_files if f not in flat and f not in GENERIC_HF_FILES]
    return flat, repo_id, hf_files


def resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Resolve a CLIP ``pretrained`` argument to a local checkpoint path, or None for random weights.

    Order: None/"none" → None (random); an existing file → that file; a packaged tag
    (`PACKAGED_WEIGHTS`: "anomalens-mini") → its file in the package; an open_clip tag → the first hit in
    ``$ANOMALENS_CACHE`` (the tag's URL file name, ``{name}-{tag}.{safetensors,pt,pth,bin}``, or
    ``<HF repo id>/<HF file>``), open_clip's URL cache (``~/.cache/clip``), the HF hub cache; if none, a
    ≤2 s probe of the download host: reachable →
    download with open_clip (what users with internet expect), unreachable → `WeightsUnavailableError`.

    Raises:
        ValueError: ``pretrained`` is neither a file nor a known tag of ``name`` (lists the valid tags).
        WeightsUnavailableError: a known tag whose weights are absent and cannot be downloaded.
    """
    if is_random(pretrained):
        return None
    pretrained = str(pretrained)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    if (name, pretrained) in PACKAGED_WEIGHTS:
        packaged = PACKAGED_WEIGHTS[name, pretrained]
        if not packaged.is_file():
            raise WeightsUnavailableError(f"packaged weights {packaged} are missing; reinstall anomalens")
        return str(packaged)
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if any(sep in pretrained for sep in ("/", "\\", ".")):
            raise ValueError(f"pretrained weights file {pretrained!r} does not exist")
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for {name!r}; valid tags: {', '.join(tags) or '(none)'}; "
            f"or pass a local checkpoint path or None for random weights"
        )
    flat, repo_id, hf_files = _clip_candidates(name, pretrained, cfg)
    looked = []
    cache = anomalens_cache()
    if cache is not None:
        looked.append(f"$ANOMALENS_CACHE={cache}")
    found = _first_file(cache, flat)
    url_cache = Path("~/.cache/clip").expanduser()
    looked.append(str(url_cache))
    found = found or _first_file(url_cache, flat)
    if repo_id:
        looked.append(f"HF cache {hf_cache_dir()} ({repo_id})")
        found = found or _hf_cached(repo_id, hf_files)
    if found:
        return found
    host = _hf_endpoint() if repo_id else cfg["url"]
    if not host_reachable(host):
        raise _unavailable("CLIP", name, pretrained, looked, urlparse(host).hostname or host)
    # Download into open_clip's default caches, where the lookups above find it next time.
    return open_clip.download_pretrained(cfg, prefer_hf_hub=repo_id is not None)


def resolve_timm_pretrained(name: str, pretrained: str | bool | None) -> str | None:
    """Resolve a timm model's weights (DINOv2) to a local file, or None for random weights.

    ``pretrained`` may be None/False/"none" (random), True/"timm"/the model's tag (the timm weights of
    ``name``), or a local file path. Looks in ``$ANOMALENS_CACHE``, the HF hub cache (``timm/<name>``) and
    torch hub's checkpoint dir; otherwise probes the host (≤2 s) and downloads, or raises
    `WeightsUnavailableError`.
    """
    import timm
    import torch.hub

    if is_random(pretrained):
        return None
    if isinstance(pretrained, str) and Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    label = "timm" if pretrained is True else str(pretrained)
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    if pretrained is not True and label.lower() not in ("timm", "true", getattr(cfg, "tag", None)):
        raise ValueError(f"pretrained weights file {label!r} does not exist (or use True / 'timm' / None)")
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"timm model {name!r} has no pretrained weights; pass a local file path or None")
    hf_files = ["model.safetensors", "pytorch_model.bin"]
    flat = [f"{name}{ext}" for ext in (".safetensors", ".pth", ".bin")]
    if cfg.url:
        flat.insert(0, os.path.basename(cfg.url))
    if cfg.hf_hub_id:
        flat += [f"{cfg.hf_hub_id}/{f}" for f in hf_files]
    looked = []
    cache = anomalens_cache()
    if cache is not None:
        looked.append(f"$ANOMALENS_CACHE={cache}")
    found = _first_file(cache, flat)
    if cfg.hf_hub_id:
        looked.append(f"HF cache {hf_cache_dir()} ({cfg.hf_hub_id})")
        found = found or _hf_cached(cfg.hf_hub_id, hf_files)
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    looked.append(str(hub_dir))
    found = found or _first_file(hub_dir, flat)
    if found:
        return found
    host = _hf_endpoint() if cfg.hf_hub_id else cfg.url
    if not host_reachable(host):
        raise _unavailable("DINO", name, label, looked, urlparse(host).hostname or host)
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(cfg.hf_hub_id, hf_files[0])
    target = hub_dir / os.path.basename(cfg.url)
    hub_dir.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(cfg.url, str(target))
    return str(target)


def is_torchscript_archive(path: str) -> bool:
    """True for the OpenAI JIT archives (``ViT-B-16.pt`` from openaipublic), which need `torch.jit.load`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") for n in archive.namelist())


def tiny_dino_kwargs() -> dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments of ``test-tiny-dino``."""
    with open(RESOURCES / f"{TEST_TINY_DINO}.json", encoding="utf-8") as f:
        return json.load(f)["kwargs"]
