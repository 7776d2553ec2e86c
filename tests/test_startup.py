"""What importing anomalens costs: the numpy-only parts load no deep-learning library, and nothing global
of another library changes at import time."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "open_clip", "timm")


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


LIGHT = [
    "import anomalens",
    "import anomalens.metrics",
    "import anomalens.data",
    "from anomalens.cli import main; main(['list'])",  # `anomalens list` reads the method sources
    "from anomalens.cli import main; main(['eval', '--help'])",
]


@pytest.mark.parametrize("statement", LIGHT)
def test_light_imports_load_no_deep_learning_library(statement):
    loaded = _run(f"import sys; {statement}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert loaded.splitlines()[-1] == "[]"  # the last line: after what a command prints


def test_metrics_work_without_torch():
    out = _run(
        "import sys, anomalens.metrics as m; "
        "print(m.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 'torch' in sys.modules)"
    )
    assert out == "0.75 False"


def test_top_level_names_resolve_on_first_use():
    import anomalens

    assert "create" in dir(anomalens) and anomalens.__version__
    assert anomalens.create is anomalens.methods.create
    assert anomalens.Prediction is anomalens.methods.Prediction
    assert "winclip" in anomalens.list_methods()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        anomalens.nope  # noqa: B018


def test_open_clip_config_table_changes_on_first_use_only():
    out = _run(
        "import open_clip, anomalens.backbones as b; before = 'test-tiny' in open_clip.list_models(); "
        "b.register_clip_configs(); print(before, 'test-tiny' in open_clip.list_models())"
    )
    assert out == "False True"


def test_list_catalog_equals_the_registry():
    """`anomalens list` reads the method files without importing them; the imported classes agree."""
    from anomalens.catalog import MethodInfo, method_catalog
    from anomalens.methods.base import list_methods, method_class

    catalog = method_catalog()
    assert list(catalog) == list_methods()
    for name, info in catalog.items():
        cls = method_class(name)
        fields = (cls.trainable, cls.needs_support, cls.default_backbone, cls.default_pretrained)
        assert info == MethodInfo(name, *fields)


def test_catalog_reads_inherited_and_non_literal_attributes(tmp_path, monkeypatch):
    import anomalens.catalog as catalog

    (tmp_path / "base.py").write_text(
        "class Method:\n    default_backbone = 'B'\n    default_pretrained = 'openai'\n"
        "    needs_support = False\n    schedule_class: type | None = None\n"
    )
    (tmp_path / "_private.py").write_text("@register('hidden')\nclass Hidden(Method):\n    pass\n")
    (tmp_path / "two.py").write_text(
        "class _Base(Method):\n    needs_support = True\n    default_pretrained = None\n\n"
        "@register('one')\nclass One(_Base):\n    schedule_class = OneSchedule\n\n"
        "@register('two')\nclass Two(_Base):\n    default_backbone = 'X'\n"
    )
    monkeypatch.setattr(catalog, "METHODS_DIR", tmp_path)
    catalog.method_catalog.cache_clear()
    try:
        assert catalog.method_catalog() == {
            "one": catalog.MethodInfo("one", True, True, "B", None),
            "two": catalog.MethodInfo("two", False, True, "X", None),
        }
        (tmp_path / "three.py").write_text(
            "@register('three')\nclass Three(Method):\n    needs_support = f()\n"
        )
        catalog.method_catalog.cache_clear()
        with pytest.raises(ValueError, match="three.py:3: needs_support must be a literal"):
            catalog.method_catalog()
    finally:
        catalog.method_catalog.cache_clear()
