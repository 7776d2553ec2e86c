#!/usr/bin/env bash
# GPU benchmark, prepared for a session that has a CUDA GPU (never run yet: no GPU was available when it
# was written). Random weights, no downloads. Writes runs/gpu_bench/<precision>/bench.{json,md} and the
# per-method benchmark JSONs under benchmarks/results/; paste the tables, with the device name, into the
# README. Usage: bash benchmarks/gpu_bench.sh [python]   (default: python on PATH)
set -euo pipefail
PY=${1:-python}
OUT=runs/gpu_bench
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# Every method at 518 px (InCTRL at its backbone's 240), batch 1/8/32, fp32 vs bf16 autocast; the
# matmul probe is a bf16 torch.mm on the same card, so the ratio column compares the two precisions.
for precision in fp32 bf16; do
    "$PY" -m anomalens.cli bench --device cuda --pretrained none --precision "$precision" \
        --methods aa-clip,anomalyclip,april-gan,core-clip,crane,patchcore,winclip \
        --set image_size=518 --image-size 518 --batch-sizes 1,8,32 --iters 10 --warmup 3 \
        --out "$OUT/$precision" --quiet
    "$PY" -m anomalens.cli bench --device cuda --pretrained none --precision "$precision" \
        --methods inctrl,inctrlv2 --image-size 518 --batch-sizes 1,8,32 --iters 10 --warmup 3 \
        --out "$OUT/$precision-inctrl" --quiet
done
# Per-method scripts on the card: InCTRL includes the official-style reference loop (batch 1, nothing
# cached); Crane and AA-CLIP report our own figures (the official code on the same card is not scripted:
# build it as tests/test_parity_{crane,aa_clip}.py do, with ANOMALENS_OFFICIAL set, and time its forward).
"$PY" benchmarks/bench_inctrl.py --device cuda --setups b16plus --batch-sizes 1 32
"$PY" benchmarks/bench_crane.py --device cuda --setups vit-l
"$PY" benchmarks/bench_aa_clip.py --device cuda --setups vit-l --batches 1 8 32
