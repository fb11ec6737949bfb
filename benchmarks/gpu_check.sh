#!/usr/bin/env bash
# Checks that need a CUDA GPU: run from anywhere on a machine with one, after `make venv`:
#     bash benchmarks/gpu_check.sh [OUT_DIR]  # PY=... to use another interpreter; outputs in OUT_DIR (or $OUT)
# Every section is a plain list of pytest / python commands; the first failing command stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$OUT"
echo "outputs in $OUT"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these checks need a GPU')"

# =====================================================================================================
# Paper-scale runner switches: device="auto", bf16 weights and autocast, gradient checkpointing,
# gradient accumulation, tokens per second and peak CUDA memory in metrics.json (docs/paper_scale.md).
# =====================================================================================================
"$PY" -m pytest -q -rs tests/test_paper_scale.py -k cuda -s

# One real run on the embedded model at the paper's effective batch (8 x 4): its metrics.json shows
# device, tokens_per_s and peak_memory_bytes (kind cuda_max_allocated).
"$PY" -m molf.lab.train --model smollm2-135m --task sql --method molf --steps 20 --batch-size 8 --grad-accum 4 \
    --seq-len 256 --device auto --autocast true --eval-limit 20 --save-model false --out-dir "$OUT/smollm2_molf"
"$PY" - "$OUT/smollm2_molf/metrics.json" <<'PYCODE'
import json, sys
m = json.load(open(sys.argv[1]))
assert m["device"].startswith("cuda") and m["peak_memory_kind"] == "cuda_max_allocated", m
print(f"device {m['device']}: {m['tokens_per_s']:.0f} tokens/s, peak {m['peak_memory_bytes'] / 2**30:.2f} GiB, "
      f"step {m['step_time_s']:.3f} s")
PYCODE

# The plan of a paper-shaped table with a step time measured on this GPU (SmolLM2-135M stands in for
# the hub models, which this check does not download).
cat > "$OUT/gpu_plan.json" <<'JSON'
{"model": "smollm2-135m", "tasks": ["sql"], "epochs": 2, "batch_size": 8, "grad_accum": 4, "seq_len": 512,
 "device": "auto", "autocast": true, "eval_limit": 50, "test_limit": 100, "seeds": [0],
 "methods": {"fft": {"lrs": [5e-5]}, "lora": {"lrs": [5e-4], "ranks": [32]},
             "molf": {"lrs": [5e-5], "ranks": [128], "alphas": [32]}}}
JSON
"$PY" -m experiments.grid "$OUT/gpu_plan.json" --plan --results "$OUT/plan_results"

# =====================================================================================================
# The optimizer on the device: the masked path against the reference optimizer, and step() under
# torch.cuda.set_sync_debug_mode("error") (a host sync fails the test), float32 and bf16 (~1 min).
# Then both benchmarks on the embedded SmolLM2-135M in bf16 (ratios side by side; put the tables in
# docs/benchmarks.md labelled with the device), and the notebook suite at 50 steps on CUDA.
# =====================================================================================================
"$PY" -m pytest -q -rs tests/test_cuda_optimizer.py tests/test_router_equivalence.py tests/test_no_sync.py \
    2>&1 | tee "$OUT/optimizer_tests.txt"
timeout 150 "$PY" benchmarks/bench_optimizer.py --device cuda --dtype bfloat16 --no-memory --reps 10 \
    --config smollm2-135m:16 --config smollm2-135m:128 | tee "$OUT/bench_optimizer_cuda_bf16.md"
timeout 150 "$PY" benchmarks/bench_train_step.py --device cuda --dtype bfloat16 --no-memory --reps 5 \
    | tee "$OUT/bench_train_step_cuda_bf16.md"
timeout 240 "$PY" -m molf.lab.suite --steps 50 -p device cuda --runs-dir "$OUT/suite" 2>&1 | tail -40 \
    | tee "$OUT/suite.txt"
echo "gpu_check: all sections passed; outputs in $OUT"

# =====================================================================================================
# (further GPU checks go below, each in its own section)
# =====================================================================================================
