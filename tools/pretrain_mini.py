"""Pre-train the `anomalens-mini` CLIP on generated image–caption pairs (see docs/anomalens-mini.md).

    PYTHONPATH=src python tools/pretrain_mini.py --out runs/mini            # the shipped weights
    cp runs/mini/anomalens-mini.safetensors src/anomalens/resources/

The defaults (steps, batch size, learning rate, seed) are the ones of the shipped weights.
"""

from __future__ import annotations

import argparse

from anomalens.backbones.pretrain import DEFAULTS, pretrain_mini


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/mini", help="output folder")
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--save-every", type=int, default=0, help="also save a checkpoint every N steps")
    parser.add_argument("--stop-after", type=int, help="end after this many steps of the --steps schedule")
    args = parser.parse_args()
    settings = {name: getattr(args, name) for name in DEFAULTS}
    path = pretrain_mini(args.out, save_every=args.save_every, stop_after=args.stop_after, **settings)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
