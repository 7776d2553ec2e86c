"""Cost as work grows (issue 14, docs/performance.md §5): time and memory of

* ``eval``: `evaluate_method` (AA-CLIP) vs the number of test images;
* ``fewshot``: few-shot `predict` (AnomalyDINO: nearest-neighbour search of every query patch over the
  K support images' patches) vs K and the input resolution;
* ``patchcore``: PatchCore's memory bank (fit time, bank rows and bytes, predict time) vs the number
  of training images, without and with greedy coreset subsampling.

Each configuration runs in a fresh process (so peak memory is its own): "added peak MB" is the
process's peak resident memory minus its resident memory just before the measured call (model and
images already loaded). Images come from ``synthetic:defects?n=100&size=256`` (generated once).

    python benchmarks/bench_scaling.py eval --values 10,25,50,100
    python benchmarks/bench_scaling.py fewshot --values 1,2,4,8 --image-sizes 112,224
    python benchmarks/bench_scaling.py patchcore --values 8,16,32,64 --coresets 1.0,0.1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DATA = "synthetic:defects?n=100&size=256"
CLASS = "disc"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", choices=("eval", "fewshot", "patchcore"))
    parser.add_argument("--values", required=True, help="images per class and label / K / training images")
    parser.add_argument("--image-sizes", default="224", help="fewshot: comma-separated input sides")
    parser.add_argument("--coresets", default="1.0,0.1", help="patchcore: comma-separated coreset ratios")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one configuration (JSON)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.study, json.loads(args.one))))
        return
    values = [int(v) for v in args.values.split(",")]
    extra = {
        "eval": [{}],
        "fewshot": [{"image_size": int(s)} for s in args.image_sizes.split(",")],
        "patchcore": [{"coreset": float(c)} for c in args.coresets.split(",")],
    }[args.study]
    rows = []
    for options in extra:
        for value in values:
            config = json.dumps({"value": value, **options})
            out = subprocess.run(
                [sys.executable, __file__, args.study, "--values", "0", "--one", config],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("| " + " | ".join("---:" for _ in keys) + " |")
    for row in rows:
        print(
            "| "
            + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys)
            + " |"
        )


def measure(study: str, config: dict) -> dict:
    import torch

    import anomalens as al

    torch.set_num_threads(1)
    value = config["value"]
    if study == "eval":
        from anomalens.evaluation import evaluate_method

        data = al.data.load(DATA, "test")
        keep = []
        for cls in data.class_names:
            for label in (0, 1):
                idx = [i for i, r in enumerate(data.records) if r.class_name == cls and r.label == label]
                keep += idx[:value]
        subset = data.subset(sorted(keep))
        method = al.create("aa-clip", backbone="test-tiny", pretrained=None, device="cpu", image_size=224)
        before, start = _rss_mb(), time.perf_counter()
        evaluate_method(method, subset, progress=False)
        seconds = time.perf_counter() - start
        return {"images": len(subset), "seconds": seconds, "ms/image": 1e3 * seconds / len(subset)} | _peak(
            before
        )
    if study == "fewshot":
        train = al.data.load(DATA, "train", [CLASS])
        test = al.data.load(DATA, "test", [CLASS])
        support = [train[i].image for i in range(value)]
        queries = [test[i].image for i in range(8)]
        size = config["image_size"]
        method = al.create(
            "anomalydino", backbone="test-tiny-dino", pretrained=None, device="cpu", image_size=size
        )
        method.predict(queries[:1], CLASS, support=support)  # warm-up
        before, start = _rss_mb(), time.perf_counter()
        method.predict(queries, CLASS, support=support, batch_size=8)
        seconds = time.perf_counter() - start
        return {"K": value, "side": size, "ms/query": 1e3 * seconds / len(queries)} | _peak(before)
    train = al.data.load(DATA, "train", [CLASS])
    test = al.data.load(DATA, "test", [CLASS])
    method = al.create(
        "patchcore",
        backbone="test-tiny",
        pretrained=None,
        device="cpu",
        image_size=224,
        coreset_ratio=config["coreset"],
    )
    subset = train.subset(list(range(value)))
    before, start = _rss_mb(), time.perf_counter()
    fitted = method.fit(subset, progress=False)
    fit_seconds = time.perf_counter() - start
    queries = [test[i].image for i in range(8)]
    start = time.perf_counter()
    method.predict(queries, CLASS, batch_size=8)
    predict = time.perf_counter() - start
    bank = method.memory_bank
    return {
        "train images": value,
        "coreset": config["coreset"],
        "fit s": fit_seconds,
        "bank rows": fitted["bank_size"],
        "bank MB": bank.numel() * bank.element_size() / 2**20,
        "ms/query": 1e3 * predict / len(queries),
    } | _peak(before)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _peak(before: float) -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"added peak MB": max(0.0, peak - before)}


if __name__ == "__main__":
    main()
