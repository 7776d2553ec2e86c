"""The option table of the `anomalens` commands (`anomalens.cli.build_parser`): the flags several
commands share, with their help, defaults and types (`SHARED`, added by `add_shared`; a command may
override some keywords), the argument types, and the ``KEY=VALUE`` action of ``--set``/``--train-set``.

Standard library only, so that ``anomalens --help`` imports nothing else.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


class Pairs(argparse.Action):
    """A repeatable ``KEY=VALUE`` flag such as ``--set``: a dict {key: JSON value, or the string when
    it is not JSON}."""

    def __call__(self, parser: Any, namespace: Any, pair: Any, flag: str | None = None) -> None:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            parser.error(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        setattr(namespace, self.dest, {**getattr(namespace, self.dest), key.strip(): parsed})


def pretrained_tag(value: str) -> str | None:
    """--pretrained: 'none' or 'random' → None (random weights), else the tag, 'openai' or a file."""
    return None if value.strip().lower() in ("none", "random") else value


def names(value: str) -> list[str]:
    """A comma-separated list of names (at least one)."""
    if not (items := [v.strip() for v in value.split(",") if v.strip()]):
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def positive_ints(value: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. ``1,2,4``."""
    numbers = [int(v) if v.isdigit() else 0 for v in names(value)]
    if not all(n >= 1 for n in numbers):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}")
    return numbers


def shots_or_full(value: str) -> int | str:
    """A number of images per class, or 'full'."""
    if value != "full" and not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a number or 'full', got {value!r}")
    return value if value == "full" else int(value)


def pairs(dest: str, help: str) -> dict[str, Any]:
    """`add_argument` keywords of a repeatable ``KEY=VALUE`` flag (`Pairs`)."""
    return {
        "dest": dest,
        "action": Pairs,
        "default": {},
        "metavar": "KEY=VALUE",
        "help": f"{help}; repeatable",
    }


# Options of several commands: flag -> `add_argument` keywords (a command may override some).
SHARED: dict[str, dict[str, Any]] = {
    "--checkpoint": {"help": "a saved model (.anomalens)"},
    "--method": {"help": "a registered method (see `anomalens list`)"},
    "--backbone": {"help": "backbone name (default: the method's)"},
    "--pretrained": {
        "type": pretrained_tag,
        "default": "default",
        "help": "open_clip tag, 'openai', a weights file, or 'none' for random weights",
    },
    "--set": pairs("options", "method option (JSON value or string)"),
    "--train-set": pairs("train_options", "option for every stage (lr=1e-4) or one (image.lr=1e-4)"),
    "--precision": {
        "choices": ("fp32", "bf16", "fp16", "int8"),
        "default": "fp32",
        "help": "image tower at inference: bf16/fp16 autocast (fp16 GPU only), "
        "int8 dynamic quantisation (CPU)",
    },
    "--data": {"action": "append", "required": True, "help": "dataset spec (repeatable)"},
    "--support": {"nargs": "+", "help": "K normal images of the class (few-shot methods)"},
    "--class-name": {"help": "object/class name given to the method (default 'object')"},
    "--threshold": {"type": float, "help": "verdict threshold (default: the checkpoint's)"},
    "--classes": {"type": names, "help": "comma-separated subset of classes"},
    "--batch-size": {"type": int, "default": 16},
    "--epochs": {"type": int},
    "--lr": {"type": float},
    "--workers": {
        "type": int,
        "help": "processes reading and resizing images while the model runs (default: up to 4; 0: none)",
    },
}


# --checkpoint or --method of a model, as `_model` reads them.
MODEL = ("--checkpoint", "--method", "--backbone", "--pretrained", "--set")


def add_shared(parser: argparse.ArgumentParser, *flags: str, **override: Any) -> None:
    """Add the `SHARED` options ``flags`` to ``parser``, with ``override`` replacing some keywords."""
    for flag in flags:
        parser.add_argument(flag, **SHARED[flag] | override)
