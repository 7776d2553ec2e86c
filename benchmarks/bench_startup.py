"""Start-up cost of the CLI against the cost of importing torch, measured alternately in one run.

    python benchmarks/bench_startup.py [--repeats 7]

Each command runs as a fresh process (`sys.executable`), alternating so that a busy machine slows both
sides alike; the figure is the ratio of the medians (goal: `anomalens --help` < 0.35 x `import torch`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "anomalens --help": [sys.executable, "-m", "anomalens.cli", "--help"],
    "anomalens list": [sys.executable, "-m", "anomalens.cli", "list"],
    "anomalens eval --help": [sys.executable, "-m", "anomalens.cli", "eval", "--help"],
    "import anomalens.metrics": [sys.executable, "-c", "import anomalens.metrics"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - start)
    torch_s = statistics.median(seconds["import torch"])
    print("| command | median s | x `import torch` |\n|---|---:|---:|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.3f} | {median / torch_s:.2f} |")


if __name__ == "__main__":
    main()
