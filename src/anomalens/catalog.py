"""What `anomalens list` shows, read without importing torch, open_clip, timm or any method module.

Methods: the modules of ``anomalens/methods`` that register methods (`method_modules`, the same list
`methods.base` imports on first use) are parsed with `ast`; each class decorated with
``@register("name")`` is one method, and its class attributes (default backbone and tag, support, the
training schedule) are the literals assigned in its class, in a base class of the same file, or in
`Method` (``base.py``). tests/test_startup.py checks every field against the imported registry.
Backbones: the names the methods are written and tested for (`anomalens.backbones` re-exports them).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

METHODS_DIR = Path(__file__).resolve().parent / "methods"

TEST_TINY = "test-tiny"
TEST_TINY_DINO = "test-tiny-dino"
# The CLIP pre-trained here on generated data (docs/anomalens-mini.md).
MINI = "anomalens-mini"
DEFAULT_DINO = "vit_base_patch14_reg4_dinov2.lvd142m"
PAPER_BACKBONES = ("ViT-B-16", "ViT-B-16-plus-240", "ViT-L-14", "ViT-L-14-336")

# The class attributes a listing needs; `trainable` is derived from `schedule_class` (as `Method` does).
_FIELDS = ("default_backbone", "default_pretrained", "needs_support", "schedule_class")


def list_backbones() -> list[str]:
    """The backbones the methods are written and tested for: the papers' CLIP ViTs, ``test-tiny``, and
    the DINO models. Any other open_clip ViT with class-token pooling and standard blocks also loads."""
    return [*PAPER_BACKBONES, TEST_TINY, MINI, DEFAULT_DINO, TEST_TINY_DINO]


def method_modules() -> list[str]:
    """Modules of `anomalens.methods` that define methods: every one but ``base`` and private ``_*``."""
    return sorted(p.stem for p in METHODS_DIR.glob("*.py") if p.stem != "base" and not p.stem.startswith("_"))


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """One registered method as `anomalens list` shows it (the same values as its class attributes)."""

    name: str
    trainable: bool
    needs_support: bool
    default_backbone: str
    default_pretrained: str | None


def listing() -> str:
    """What `anomalens list` prints: each method (trainable or training-free, zero- or few-shot, default
    backbone and tag), then the backbone names."""
    lines = ["methods:"]
    for name, info in method_catalog().items():
        kind = "trainable" if info.trainable else "training-free"
        shots = "few-shot" if info.needs_support else "zero-shot"
        default = f"{info.default_backbone} ({info.default_pretrained})"
        lines.append(f"  {name:<12} {kind:<13} {shots:<9} default: {default}")
    lines.append("backbones (--backbone; --pretrained: an open_clip tag, 'openai', a file, or 'none'):")
    lines.append("  " + ", ".join(list_backbones()))
    return "\n".join(lines)


@functools.cache
def method_catalog() -> dict[str, MethodInfo]:
    """Every registered method by name, sorted, read from the sources of ``anomalens/methods``."""
    defaults = _classes(METHODS_DIR / "base.py")["Method"].own
    found: dict[str, MethodInfo] = {}
    for module in method_modules():
        classes = _classes(METHODS_DIR / f"{module}.py")
        for cls, parsed in classes.items():
            values = defaults | _inherited(cls, classes)
            for name in parsed.registered:
                found[name] = MethodInfo(
                    name=name,
                    trainable=values["schedule_class"] is not None,
                    needs_support=values["needs_support"],
                    default_backbone=values["default_backbone"],
                    default_pretrained=values["default_pretrained"],
                )
    return dict(sorted(found.items()))


class _Class(NamedTuple):
    """A top-level class of a method file, as far as the listing needs it."""

    registered: list[str]  # the names of its @register decorators
    own: dict[str, Any]  # the `_FIELDS` its body assigns
    bases: list[str]


_Classes = dict[str, _Class]


def _classes(path: Path) -> _Classes:
    classes: _Classes = {}
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        registered = [
            d.args[0].value
            for d in node.decorator_list
            if isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "register"
        ]
        own = {}
        for stmt in node.body:
            target = stmt.targets[0] if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
            value = getattr(stmt, "value", None)
            if isinstance(target, ast.Name) and target.id in _FIELDS and value is not None:
                own[target.id] = _value(target.id, value, path)
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        classes[node.name] = _Class(registered, own, bases)
    return classes


def _inherited(cls: str, classes: _Classes) -> dict[str, Any]:
    """The `_FIELDS` a class sets or inherits from base classes of the same file (first base wins)."""
    values: dict[str, Any] = {}
    for base in reversed(classes[cls].bases):
        if base in classes:
            values |= _inherited(base, classes)
    return values | classes[cls].own


def _value(field: str, node: ast.expr, path: Path) -> Any:
    if field == "schedule_class":  # a class name: only "is there one" matters
        return None if isinstance(node, ast.Constant) and node.value is None else ast.unparse(node)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(
            f"{path.name}:{node.lineno}: {field} must be a literal for `anomalens list`"
        ) from None
