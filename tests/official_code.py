"""The official implementations, imported from the checkouts under ``$ANOMALENS_OFFICIAL`` (never copied
into this tree), and the glue that runs them on our random weights, in one place for the parity tests
(``tests/test_parity_*.py``) and the side-by-side benchmark (``benchmarks/bench_official.py``, which puts
this folder on ``sys.path``).

Each ``*_modules()`` context manager puts an official tree on ``sys.path``, stubs the imports that its
compared paths never use (only where they are not installed), imports the modules and, on exit, removes
every module of that tree (its top-level names would shadow other trees': ``model``, ``models``,
``utils``, ``dataset``...) and the stubs again. The builders below them construct the official model from
its own classes with our backbone's dimensions and weights; the ``*_official_*`` functions are the
inference (and loss) glue of the official ``test.py`` / ``train.py`` written with its own functions.
InCTRL's tree ships a package named ``open_clip`` that would shadow the installed one, so it runs in a
subprocess: `INCTRL_PREAMBLE` is the start of every such script.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL = Path(os.environ.get("ANOMALENS_OFFICIAL", "/nonexistent"))
AA_CLIP = OFFICIAL / "AA-CLIP"
CRANE = OFFICIAL / "Crane"
INCTRL = OFFICIAL / "InCTRL"
ADACLIP = OFFICIAL / "AdaCLIP"
ANOMALYDINO = OFFICIAL / "AnomalyDINO"
DINOV2 = OFFICIAL / "dinov2"
MUSC = OFFICIAL / "MuSc"

# A file that each checkout must hold for its tests / benchmark rows to run.
MARKERS = {
    "aa-clip": AA_CLIP / "model" / "adapter.py",
    "crane": CRANE / "models" / "Crane.py",
    "inctrl": INCTRL / "open_clip" / "model.py",
    "adaclip": ADACLIP / "method" / "adaclip.py",
    "anomalydino": ANOMALYDINO / "src" / "backbones.py",
    "dinov2": DINOV2 / "dinov2" / "hub" / "backbones.py",
    "musc": MUSC / "models" / "modules" / "_MSM.py",
}


def available(*names: str) -> bool:
    """Whether the official checkouts of `names` (keys of `MARKERS`) are present."""
    return all(MARKERS[name].is_file() for name in names)


def _stub(name: str, **attributes: object) -> types.ModuleType:
    """An empty importable module (with a spec, which torch's lazy imports look for)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.__dict__.update(attributes)
    return module


@contextmanager
def _imported(
    roots: Sequence[Path],
    names: dict[str, str],
    stubs: dict[str, dict[str, object]] | None = None,
    packages: dict[str, Path] | None = None,
) -> Iterator[types.SimpleNamespace]:
    """``names`` (attribute → module) imported with `roots` first on ``sys.path``; `stubs` (module →
    attributes) stand in for modules that are not installed, `packages` (name → folder) are empty packages
    whose ``__init__`` is bypassed. Everything imported from the roots is removed again on exit."""
    top = set(packages or ())
    for root in roots:
        top |= {p.stem for p in root.iterdir() if p.is_dir() or p.suffix == ".py"}
    missing = {n.split(".")[0] for n in stubs or ()}
    missing = {n for n in missing if n not in sys.modules and importlib.util.find_spec(n) is None}
    added = [name for name in stubs or () if name.split(".")[0] in missing]
    for name in added:
        sys.modules[name] = _stub(name, **stubs[name])
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    for name, folder in (packages or {}).items():
        package = _stub(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    before = set(sys.modules)
    sys.path[:0] = [str(r) for r in roots]
    try:
        yield types.SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})
    finally:
        del sys.path[: len(roots)]
        for name in set(sys.modules) - before:
            if name.split(".")[0] in top:
                del sys.modules[name]
        for name in [*added, *(packages or ())]:
            sys.modules.pop(name, None)


def load_file(path: Path, name: str) -> types.ModuleType:
    """One official source file imported as module `name` (no package, nothing on ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- AA-CLIP
# The official ``AdaptedCLIP`` hard-codes ViT-L-14-336 (widths 1024/768, 24 + 12 blocks).
AA_CLIP_BACKBONE = "ViT-L-14-336"


@contextmanager
def aa_clip_modules() -> Iterator[types.SimpleNamespace]:
    """``model.model``, ``model.clip``, ``model.adapter``, ``forward_utils``, ``dataset`` of AA-CLIP (needs
    kornia; ipdb, cv2, pandas and pkg_resources are imported but unused on the compared paths)."""
    import packaging.version

    stubs = {"ipdb": {}, "cv2": {}, "pandas": {}, "pkg_resources": {"packaging": packaging}}
    names = {
        "model": "model.model",
        "clip": "model.clip",
        "adapter": "model.adapter",
        "forward": "forward_utils",
        "dataset": "dataset",
    }
    with _imported([AA_CLIP], names, stubs) as mods:
        yield mods


def aa_clip_native_weights(backbone: str = AA_CLIP_BACKBONE) -> dict[str, torch.Tensor]:
    """The random open_clip `backbone` weights our ``load_clip(pretrained=None)`` builds."""
    import open_clip

    from anomalens.backbones.registry import RANDOM_INIT_SEED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # what load_clip does for pretrained=None
        return open_clip.create_model(backbone, pretrained=None, quick_gelu=False).state_dict()


def aa_clip_official_clip(
    mods, native: dict[str, torch.Tensor], size: int, cfg: dict | None = None
) -> nn.Module:
    """The official CLIP at `size` px with `native`'s weights (its loader resamples the positions); `cfg`
    is its model config, ViT-L-14-336's by default."""
    cfg = copy.deepcopy(cfg) if cfg is not None else mods.clip.get_model_config(AA_CLIP_BACKBONE)
    cfg["vision_cfg"]["image_size"] = size
    clip = mods.model.CLIP(**cfg)
    weights = dict(native)
    mods.model.resize_pos_embed(weights, clip)
    clip.load_state_dict(weights, strict=True)
    return clip.eval()


def aa_clip_pair(
    mods, run: Path, size: int, backbone: str = AA_CLIP_BACKBONE, cfg: dict | None = None, **options: Any
) -> tuple[nn.Module, Any]:
    """(official AdaptedCLIP with random adapters, our method converted from them) at `size` px on the
    random `backbone` (`cfg`: its config for the official CLIP, when not ViT-L-14-336); the adapters are
    saved in the official checkpoint layout in `run` and read back by our converter."""
    from anomalens.converters import convert

    clip = aa_clip_official_clip(mods, aa_clip_native_weights(backbone), size, cfg)
    torch.manual_seed(1)
    theirs = mods.adapter.AdaptedCLIP(clip_model=clip, relu=False).eval()
    torch.save({"epoch": 5, "text_adapter": theirs.text_adapter.state_dict()}, run / "text_adapter.pth")
    torch.save({"epoch": 20, "image_adapter": theirs.image_adapter.state_dict()}, run / "image_adapter.pth")
    ours = convert(
        "aa-clip",
        str(run),
        backbone=backbone,
        pretrained=None,
        image_size=size,
        device="cpu",
        **options,
    )
    return theirs, ours


def aa_clip_training_models(
    mods,
    run: Path,
    size: int,
    dtype: torch.dtype = torch.float32,
    backbone: str = AA_CLIP_BACKBONE,
    cfg: dict | None = None,
) -> tuple[nn.Module, nn.Module, Any]:
    """What train.py's loops take: (official ``clip_surgery``, official AdaptedCLIP, our official_compat
    method from `aa_clip_pair`), in `dtype`. To halve the memory the three hold the frozen CLIP once (each
    official tensor equal to ours is ours) and the official CLIP is frozen: train.py leaves its
    ``requires_grad`` on and computes gradients that no optimiser reads."""
    theirs, ours = aa_clip_pair(mods, run, size, backbone, cfg, official_compat=True)
    ours.to(dtype)
    clip = theirs.clipmodel.requires_grad_(False)
    theirs.to(dtype)
    frozen = ours.backbone.model.state_dict(keep_vars=True)
    for name, tensor in clip.state_dict(keep_vars=True).items():
        if name in frozen and torch.equal(tensor, frozen[name]):
            tensor.data = frozen[name].data
    surgery = copy.deepcopy(clip, {id(t): t for t in clip.state_dict(keep_vars=True).values()})
    surgery.visual.DAPM_replace(DPAM_layer=20)  # train.py's default --surgery_until_layer
    return surgery, theirs, ours


def aa_clip_train_module() -> types.ModuleType:
    """The official ``train.py`` (inside `aa_clip_modules`, which removes it again), with the 4 threads and
    ``OMP_NUM_THREADS``... it sets when imported undone at once (its training functions set nothing)."""
    threads, environ = torch.get_num_threads(), dict(os.environ)
    try:
        return importlib.import_module("train")
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


def aa_clip_official_text(mods, theirs, class_name: str) -> torch.Tensor:
    """The class's adapted text embedding (E, 2), computed once per class by test.py."""
    with torch.no_grad():
        return mods.forward.get_adapted_single_class_text_embedding(theirs, "MVTec", class_name, "cpu")


def aa_clip_official_predict(mods, theirs, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """test.py's ``get_predictions`` on a batch of normalised images: (summed similarity maps (B, S, S),
    image terms (B,))."""
    with torch.no_grad():
        patch_features, det = theirs(x)
        maps = sum(
            mods.forward.calculate_similarity_map(f, text, x.shape[-1], test=True, domain="Industrial")
            for f in patch_features
        )[:, 0]
        terms = ((det @ text)[:, 1] + 1) / 2
    return maps, terms


# ------------------------------------------------------------------------------------------------ Crane
# The configurations compared, name → (our options, the official dino_model).
CRANE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "crane": ({"layers": (6, 12, 18, 24), "use_dattn": False, "soft_mean": True}, "none"),
    "crane+": ({"layers": (24,), "use_dattn": True, "dino": "test-tiny-dino", "soft_mean": False}, "dinov2"),
    "multi-tap+dattn": (
        {
            "layers": (18, 24),
            "eattn_start": 12,
            "use_dattn": True,
            "dino": "test-tiny-dino",
            "soft_mean": True,
        },
        "dinov2",
    ),
}


@contextmanager
def crane_modules() -> Iterator[types.SimpleNamespace]:
    """``models.Crane``, ``models.prompt_ensemble``, ``utils.similarity``, ``utils.loss`` of Crane."""
    import packaging.version

    stubs = {"pkg_resources": {"packaging": packaging}, "humanhash": {"humanize": lambda *a, **k: "x"}}
    names = {
        "crane": "models.Crane",
        "prompts": "models.prompt_ensemble",
        "similarity": "utils.similarity",
        "loss": "utils.loss",
    }
    with _imported([CRANE], names, stubs) as mods:
        yield mods


class HubStyleDino(nn.Module):
    """The timm DINO of our method behind the torch.hub DINOv2 call the official code makes."""

    def __init__(self, dino):
        super().__init__()
        self.dino = dino

    def get_intermediate_layers(self, x, reshape=True):
        side = self.dino.input_size(x.shape[-1])
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        tokens = self.dino.model.forward_features(x)[:, self.dino.model.num_prefix_tokens :]
        grid = side // self.dino.patch_size
        return [tokens.transpose(1, 2).reshape(x.shape[0], -1, grid, grid)]


def crane_official_model(mods, ours, dino_model: str, train: bool) -> tuple[nn.Module, nn.Module, Any]:
    """(official Crane, its PromptLearner, its args) with `ours`' backbone dimensions and weights, E-Attn
    from our mapped start block. Adaptations outside its code: its visual tower is rebuilt with our head
    count (it derives width // 64), its hard-coded QuickGELU is replaced by our backbone's activation,
    and its torch.hub DINOv2 by our DINO (`HubStyleDino`)."""
    from anomalens.backbones import load_clip

    bb = ours.backbone
    size = ours.config.image_size
    args = types.SimpleNamespace(
        image_size=size,
        dino_model=dino_model,
        both_eattn_dattn=True,
        train_with_img_cls_type="pad_suffix",
        train_with_img_cls_prob=1 if train else 0,
    )
    details = {
        "Prompt_length": ours.config.n_ctx,
        "learnabel_text_embedding_depth": len(ours.deep_prompts) + 1,
        "learnabel_text_embedding_length": ours.config.deep_prompt_length,
        "others": args,
    }
    native = load_clip(bb.name, None)  # positions at the native size: the official code resamples them
    model = mods.crane.Crane(
        bb.embed_dim,
        native.image_size,
        bb.depth,
        bb.width,
        bb.patch_size,
        77,
        bb.model.token_embedding.num_embeddings,
        bb.text_width,
        bb.model.transformer.resblocks[0].attn.num_heads,
        bb.text_depth,
        design_details=details,
    )
    model.visual = mods.crane.VisionTransformer(
        native.image_size, bb.patch_size, bb.width, bb.depth, bb.heads, bb.embed_dim, design_details=details
    )
    model.load_state_dict(native.model.state_dict(), strict=True)
    activation = type(bb.model.visual.transformer.resblocks[0].mlp.gelu)
    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        block.mlp.gelu = activation()
    model.visual.replace_with_EAttn(to_layer=bb.depth - ours.eattn_start + 2, type="qq+kk+vv")
    if dino_model != "none":
        model.vfm, model.vfm_model = HubStyleDino(ours.dino), "dinov2"
    prompt_learner = mods.prompts.PromptLearner(model, details)
    return model.eval(), prompt_learner, args


def crane_official_text(model, prompt_learner) -> torch.Tensor:
    """The static learned-prompt text features (1, 2, E), computed once by test.py when
    ``train_with_img_cls_prob`` is 0 (its default)."""
    with torch.no_grad():
        prompts, tokenized, compound, _ = prompt_learner()
        text = model.encode_text_learn(prompts, tokenized, compound).float()
        return F.normalize(torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1), dim=-1)


def crane_official_predict(mods, model, text, images, layers, soft_mean):
    """test.py's ``ScoreCalculator.forward`` with the static `text` features, then σ = 4: (scores (B,),
    smoothed maps (B, S, S)) as NumPy arrays."""
    from scipy.ndimage import gaussian_filter

    sim = mods.similarity
    size = images.shape[-1]
    with torch.no_grad():
        image_features, patch_list = model.encode_image(images, layers, self_cor_attn_layers=20)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        patches = torch.stack([p / p.norm(dim=-1, keepdim=True) for p in patch_list])
        logits = [sim.calc_similarity_logits(p, text) for p in patches]
        if soft_mean:
            score_map = torch.stack([sim.regrid_upsample(x.softmax(dim=-1), size) for x in logits]).mean(
                dim=0
            )
        else:
            score_map = (
                torch.stack([sim.regrid_upsample(x, size) for x in logits]).mean(dim=0).softmax(dim=-1)
            )
        pooled = mods.crane.ScoreBasePooling().forward(patches, logits)
        image_features = F.normalize(0.5 * pooled + 0.5 * image_features, dim=1)
        scores = sim.calc_similarity_logits(image_features, text).softmax(dim=-1)[:, 1]
    maps = np.stack([gaussian_filter(m, sigma=4) for m in score_map[..., 1].numpy()])
    return scores.numpy(), maps


def crane_official_loss(mods, model, prompt_learner, images, masks, labels, layers):
    """One train.py step's loss (image context inserted, nearest upsampling)."""
    sim = mods.similarity
    size = images.shape[-1]
    image_features, patch_list = model.encode_image(images, layers, self_cor_attn_layers=20)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    patches = torch.stack([p / p.norm(dim=-1, keepdim=True) for p in patch_list])
    prompts, tokenized, compound, with_context = prompt_learner(img_emb=image_features)
    assert with_context
    normal = model.encode_text_learn(prompts[0], tokenized[0], compound)
    anomalous = model.encode_text_learn(prompts[1], tokenized[1], compound)
    text = F.normalize(torch.stack([normal, anomalous], dim=1), dim=-1).float()
    focal = dice = 0
    logits = []
    for p in patches:
        x = sim.calc_similarity_logits(p, text, temp=0.07)
        logits.append(x)
        probs = sim.regrid_upsample(x.softmax(dim=-1), size, mode="nearest")
        dice = dice + mods.loss.BinaryDiceLoss()((1 - probs[..., 0] + probs[..., 1]) / 2, masks)
        focal = focal + mods.loss.FocalLoss()(probs.permute(0, 3, 1, 2), masks)
    pooled = mods.crane.ScoreBasePooling().forward(patches, logits)
    image_features = F.normalize(0.5 * pooled + 0.5 * image_features, dim=1)
    ce = F.cross_entropy(sim.calc_similarity_logits(image_features, text, temp=0.01), labels)
    return 2 * focal + 2 * dice + 0.2 * ce


# ---------------------------------------------------------------------------------------------- AdaCLIP
@contextmanager
def adaclip_modules() -> Iterator[types.SimpleNamespace]:
    """``method.clip_model``, ``method.adaclip``, ``method.simple_tokenizer``, ``loss`` of AdaCLIP; its
    ``method/__init__.py`` (trainer, OpenCV, plotting) is bypassed with an empty package."""
    import packaging.version

    names = {
        "clip": "method.clip_model",
        "adaclip": "method.adaclip",
        "tokenizer": "method.simple_tokenizer",
        "loss": "loss",
    }
    stubs = {"pkg_resources": {"packaging": packaging}}
    with _imported([ADACLIP], names, stubs, packages={"method": ADACLIP / "method"}) as mods:
        yield mods


def adaclip_pair(mods, path: Path, options: dict[str, Any], k_clusters: int) -> tuple[nn.Module, Any]:
    """(official AdaCLIP, our converted AdaClip) sharing backbone and random learned weights; `options`
    are our ``al.create`` options (backbone, image_size, ...), the official state is saved at `path`."""
    import functools

    import open_clip

    import anomalens as al
    from anomalens.converters.adaclip import convert

    torch.manual_seed(0)
    bb = al.create("adaclip", **options).backbone
    size = options["image_size"]
    cfg = mods.clip
    vision = cfg.CLIPVisionCfg(
        layers=bb.depth, width=bb.width, head_width=bb.head_dim, patch_size=bb.patch_size
    )
    vision.image_size = size
    text = cfg.CLIPTextCfg(width=bb.text_width, heads=bb.model.transformer.resblocks[0].attn.num_heads)
    text.layers = bb.text_depth
    clip = cfg.CLIP(bb.embed_dim, vision, text)
    missing, _ = clip.load_state_dict(bb.model.state_dict(), strict=False)
    assert not missing, missing
    clip.eval()
    layers = [bb.depth // 4 * i for i in (1, 2, 3, 4)]  # official test.py: depth // 4 · [1..4]
    # The checkout's BPE vocabulary is a Git LFS pointer: its tokenizer class reads open_clip's copy.
    bpe = str(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
    mods.adaclip._Tokenizer = functools.partial(mods.tokenizer.SimpleTokenizer, bpe)
    model = mods.adaclip.AdaCLIP(
        freeze_clip=clip,
        text_channel=bb.embed_dim,
        visual_channel=bb.width,
        prompting_length=5,
        prompting_depth=4,
        prompting_branch="VL",
        prompting_type="SD",
        use_hsf=True,
        k_clusters=k_clusters,
        output_layers=layers,
        device="cpu",
        image_size=size,
    )
    learnable = ("prompter", "token_layer", "prompt_generator")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in learnable):
                p.copy_(torch.randn(p.shape) * (0.02 if "static" in name else 0.1))
    state = {
        f"clip_model.{k}": v for k, v in model.state_dict().items() if any(key in k for key in learnable)
    }
    torch.save(state, path)
    return model, convert(path, k_clusters=k_clusters, official_compat=True, **options)


def adaclip_official_predict(model, image: torch.Tensor, class_name: str, seed: int):
    """test.py on one normalised image (the only batch size it runs): (score (1,), smoothed map (S, S));
    its k-means has no seed of its own (NumPy's global state), so that state is seeded first."""
    from scipy.ndimage import gaussian_filter

    np.random.seed(seed)
    with torch.no_grad():
        amap, score = model(image, [class_name], aggregation=True)
    return score.float(), gaussian_filter(amap[0].numpy(), sigma=4)


# ------------------------------------------------------------------------------------------ AnomalyDINO
@contextmanager
def anomalydino_modules() -> Iterator[types.SimpleNamespace]:
    """AnomalyDINO's ``src.backbones``, ``src.utils``, ``src.post_eval`` and the DINOv2 hub builder
    ``dinov2.hub.backbones`` (needs OpenCV; matplotlib, for plots only, is stubbed when absent)."""
    stubs = {"matplotlib": {}, "matplotlib.pyplot": {}}
    names = {
        "backbones": "src.backbones",
        "utils": "src.utils",
        "post_eval": "src.post_eval",
        "hub": "dinov2.hub.backbones",
    }
    with _imported([DINOV2, ANOMALYDINO], names, stubs) as mods:
        yield mods


def anomalydino_pair(mods, size: int) -> tuple[Any, Any]:
    """(official ``DINOv2Wrapper`` on a random ``dinov2_vits14``, our AnomalyDINO with the same weights,
    ``rotation=False`` and ``official_compat=True``); LayerScale and norms are perturbed off identity."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    from anomalens.backbones import DinoBackbone
    from anomalens.methods.anomalydino import AnomalyDINO

    torch.manual_seed(0)
    reference = mods.hub.dinov2_vits14(pretrained=False).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "ls1" in name or "ls2" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = checkpoint_filter_fn(reference.state_dict(), timm.create_model("vit_small_patch14_dinov2"))
    vit = timm.create_model("vit_small_patch14_dinov2", num_classes=0, dynamic_img_size=True)
    vit.load_state_dict(state, strict=True)
    dino = DinoBackbone(vit, name="vit_small_patch14_dinov2", pretrained=None, image_size=size)
    config = AnomalyDINO.make_config(image_size=size, rotation=False, masking="on", official_compat=True)
    method = AnomalyDINO(config, dino).eval()
    hub = torch.hub.load
    torch.hub.load = lambda *args, **kwargs: reference
    try:
        wrapper = mods.backbones.get_model("dinov2_vits14", "cpu", smaller_edge_size=size)
    finally:
        torch.hub.load = hub
    return wrapper, method


def anomalydino_images(n: int, seed: int, size: int = 160) -> list[np.ndarray]:
    """Smooth random colour fields with a bright square "object" in the middle, so that the zero-shot
    masks vary and the first principal component of the patch features is well separated."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
        image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        lo, hi = size // 4, 3 * size // 4
        image[lo:hi, lo:hi] = 0.5 * image[lo:hi, lo:hi] + 120
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


def anomalydino_memory_bank(mods, wrapper, support: list[np.ndarray]) -> np.ndarray:
    """The official memory bank: every patch of every rotation of every support image, unit length."""
    bank = []
    for image in support:
        for rotated in mods.utils.augment_image(image):
            tensor, _ = wrapper.prepare_image(rotated)
            bank.append(wrapper.extract_features(tensor))  # mask_ref_images=False: every patch
    bank = np.concatenate(bank).astype(np.float32)
    return bank / np.linalg.norm(bank, axis=1, keepdims=True)


def anomalydino_official_predict(mods, wrapper, bank: np.ndarray, tests: list[np.ndarray]):
    """run_anomaly_detection's test loop (detection.py) with faiss replaced by its definition for
    ``knn_metric="L2_normalized"`` (squared L2 between unit vectors / 2): (scores, maps, masks)."""
    scores, maps, masks = [], [], []
    for image in tests:
        tensor, grid = wrapper.prepare_image(image)
        features = wrapper.extract_features(tensor)
        mask = wrapper.compute_background_mask(features, grid, threshold=10, masking_type=True)
        query = features[mask]
        query = query / np.linalg.norm(query, axis=1, keepdims=True)
        # faiss IndexFlatL2, k=1: the smallest squared L2 distance, |q|² + |b|² − 2 q·b.
        squared = ((query**2).sum(1)[:, None] + (bank**2).sum(1)[None] - 2 * query @ bank.T).min(axis=1)
        distances = np.zeros_like(mask, dtype=float)
        distances[mask] = squared / 2
        scores.append(mods.post_eval.mean_top1p(distances.flatten()))
        maps.append(mods.utils.dists2map(distances.reshape(grid), image.shape))
        masks.append(mask)
    return np.array(scores), maps, masks


# ----------------------------------------------------------------------------------------------- DINOv2
@contextmanager
def dinov2_modules() -> Iterator[types.SimpleNamespace]:
    """DINOv2's ``dinov2.hub.backbones`` and ``dinov2.models.vision_transformer``, and Crane's
    ``utils/transform.py`` (loaded from its file)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="xFormers is not available")
        names = {"hub": "dinov2.hub.backbones", "vits": "dinov2.models.vision_transformer"}
        with _imported([DINOV2], names) as mods:
            mods.transform = load_file(CRANE / "utils" / "transform.py", "crane_transform")
            yield mods


# ------------------------------------------------------------------------------------------------- MuSc
def musc_modules() -> types.SimpleNamespace:
    """MuSc's ``models/modules/_LNAMD.py``, ``_MSM.py`` and ``_RsCIN.py``, loaded from their files."""
    folder = MUSC / "models" / "modules"
    return types.SimpleNamespace(
        **{n: load_file(folder / f"_{n}.py", f"official_musc_{n}") for n in ("LNAMD", "MSM", "RsCIN")}
    )


def musc_official_scores(mods, tokens: list[torch.Tensor], r_list: Sequence[int]) -> torch.Tensor:
    """models/musc.py's patch scores from per-layer tokens (N, 1 + L, C), CLS first: per r, LNAMD then
    L2 normalisation, per layer ``MSM(Z, topmin_min=0, topmin_max=0.3)``, mean over layers, then over r."""
    layers, c = len(tokens), tokens[0].shape[-1]
    out = []
    for r in r_list:
        embed = mods.LNAMD.LNAMD(device="cpu", r=r, feature_dim=c, feature_layer=list(range(layers)))
        features = embed._embed(tokens)  # (N, L, layers, C)
        features = features / features.norm(dim=-1, keepdim=True)
        maps = [mods.MSM.MSM(features[:, :, i], "cpu", 0, 0.3) for i in range(layers)]
        out.append(torch.stack(maps).mean(0))
    return torch.stack(out).mean(0)  # (N, L)


# ------------------------------------------------------------------------------------------------ InCTRL
# The start of every script run in the InCTRL tree (argv: repo, input file, output file). Its code
# hard-codes CUDA and imports training-only packages: CUDA calls are mapped to the CPU and those packages
# are stubbed. `inctrl_memoise_text(model)` memoises its (pure) text encoder.
INCTRL_PREAMBLE = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys
    from unittest import mock
    import torch

    repo, inp, out = sys.argv[1:4]
    sys.path.insert(0, repo)
    torch.set_num_threads(1)
    sys.modules.setdefault("simplejson", json)

    class Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("iopath", "fvcore", "psutil", "matplotlib"):
                return importlib.util.spec_from_loader(name, self, is_package=True)
        def create_module(self, spec):
            module = mock.MagicMock(name=spec.name)
            module.__path__, module.__spec__ = [], spec
            return module
        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Stubs())
    torch.Tensor.cuda = lambda self, *a, **k: self
    to = torch.Tensor.to
    def cpu_to(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        return to(self, *args, **kwargs)
    torch.Tensor.to = cpu_to

    import open_clip
    from open_clip.model import InCTRL

    def inctrl_memoise_text(model):
        encode_text, memo = model.encode_text, {}
        def cached(tokens, normalize=False):
            key = (tokens.numpy().tobytes(), normalize)
            if key not in memo:
                memo[key] = encode_text(tokens, normalize)
            return memo[key]
        model.encode_text = cached
    """
)


def inctrl_script(body: str) -> str:
    """A script for the InCTRL tree: `INCTRL_PREAMBLE` then `body` (dedented)."""
    return INCTRL_PREAMBLE + textwrap.dedent(body)


def run_inctrl(body: str, inputs: dict, tmp: Path, timeout: int) -> dict:
    """Run ``inctrl_script(body)`` in the InCTRL tree on `inputs` (saved as its input file); its output."""
    torch.save(inputs, tmp / "in.pt")
    (tmp / "runner.py").write_text(inctrl_script(body))
    argv = [sys.executable, str(tmp / "runner.py"), str(INCTRL), str(tmp / "in.pt"), str(tmp / "out.pt")]
    subprocess.run(argv, cwd=INCTRL, check=True, timeout=timeout)
    return torch.load(tmp / "out.pt")


def save_inctrl_checkpoint(state: dict[str, torch.Tensor], tmp: Path, name: str) -> tuple[Path, Path]:
    """(official checkpoint, CLIP weights for our converter's ``pretrained``) from an official state
    dict; the official model has no ``logit_scale``, CLIP's initial value is added."""
    clip = {k: v for k, v in state.items() if not k.startswith(("adapter.", "diff_head"))}
    clip["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    torch.save(clip, tmp / "clip.pt")
    torch.save(state, tmp / name)
    return tmp / name, tmp / "clip.pt"
