#!/usr/bin/env bash
# The prepared GPU check, one command: on a CUDA machine, the CUDA tests, where a step's time goes
# (step_cost.py) and a short benchmark at the task's batch and at 8x through gradient accumulation,
# each ratio against the plain Trainer in the same run; JSON under the folder given (default
# gpu_check_out/). Sized for under 8 minutes on one H100/H200.
# With no GPU it says so and runs a dry run of the same steps on the CPU with --quick sizes
# (exit 0), which CI runs, so the script cannot rot between GPU loans.
#   bash scripts/gpu_check.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
py="${PYTHON:-python}"
if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    quick=()
    echo "GPU: $("$py" -c 'import torch; print(torch.cuda.get_device_name())')"
else
    quick=(--quick)
    echo "no CUDA device: dry run of the same steps on the CPU with --quick sizes"
fi
"$py" -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.txt"
"$py" scripts/diagnostics/step_cost.py --tasks sentiment,gpt2_scratch "${quick[@]}" --out "$out/step_cost.json" \
    --workdir "$out/runs"
"$py" scripts/benchmark.py --task sentiment --configs trainer,default "${quick[@]}" --out "$out/sentiment.json" \
    --workdir "$out/runs"
"$py" scripts/benchmark.py --task gpt2_scratch --grad_accum 8 --vsa_steps_factor 2 \
    --configs trainer,default,trainer_small "${quick[@]}" --out "$out/large_batch_gpt2_scratch.json" --workdir "$out/runs"
echo "gpu_check: wrote $(ls "$out"/*.json | tr '\n' ' ')"
