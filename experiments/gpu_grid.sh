#!/usr/bin/env bash
# The evidence v2 main table on one CUDA GPU, in one command (after `make venv`):
#     bash experiments/gpu_grid.sh [BUDGET_MIN]    # default 8: start no new cell after that many minutes
# experiments/main_v2_gpu.json: main_v2's tasks, methods and lr sweeps in bf16 autocast, 2 epochs at an
# effective batch of 32, 3 seeds; results in results/v2_gpu/ (a table of its own, labelled with the
# device in docs/evidence.md). Rerun the same command to continue an unfinished table; the report is
# printed at the end from whatever has finished.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this grid needs a GPU')"
mkdir -p results/v2_gpu
"$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tee results/v2_gpu/device.txt
"$PY" -m experiments.grid experiments/main_v2_gpu.json --budget-min "${1:-8}"
"$PY" -m experiments.report --results results/v2_gpu --table main_v2_gpu
