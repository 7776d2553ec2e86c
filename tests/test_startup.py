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


LIGHT = ["import anomalens", "import anomalens.metrics", "import anomalens.data"]


@pytest.mark.parametrize("statement", LIGHT)
def test_light_imports_load_no_deep_learning_library(statement):
    loaded = _run(f"import sys; {statement}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert loaded == "[]"


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
