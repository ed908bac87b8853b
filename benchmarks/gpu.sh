#!/usr/bin/env bash
# The GPU benchmark suite in one command, on a machine with one NVIDIA GPU where jax (with
# its CUDA plugin), flax, optax and torch (a CUDA build) are already installed:
#
#     bash benchmarks/gpu.sh                 # the suite: writes benchmarks/results/gpu-gpu-<time>.json,
#                                            # benchmarks/results/latest.json, benchmarks/results/ratios.png,
#                                            # benchmarks/results/README_results.md; prints the tables
#     bash benchmarks/gpu.sh --dry-run       # print the plan, run nothing
#     bash benchmarks/gpu.sh --smoke         # the same machinery at toy sizes (works on a CPU)
#
# Extra arguments go to `python -m benchmarks.run` (e.g. --budget-seconds 480).
#
# What it runs, in this order (see gpu_plan in benchmarks/plans.py, and benchmarks/run.py):
#   1. parity: the same weights in both frameworks, logits and Grad-CAM compared (no TF32);
#   2. time to accuracy: the full recipe in each framework (width 1, all 50,000 images,
#      24 epochs, batch 512, fp16 with loss scaling / AMP + GradScaler), target 94%;
#   3. train throughput, fp16, bf16 and fp32, width 1.0, batch 512
#      (jaxres: one lax.scan program per measurement; PyTorch: channels_last, cudnn.benchmark,
#      AMP, tensors on the GPU; the first setting also with the original DataLoader pipeline;
#      `--torch-compile` adds a torch.compile row, `--widths 1 0.25 --batches 512 128` the small
#      model: by the per-row estimates, plans.estimated_gpu_seconds, the default plan takes
#      about 435 s and the wider one about 1,015 s, over the budget);
#   4. eval throughput (fp32, bf16, fp16) and Grad-CAM throughput (fp32).
# A row starts only if it should end within the time budget (500 s, judged by the last row
# of its kind); rows after it are recorded as
# skipped, so the whole script stays under 10 minutes (a hard `timeout` backs this up).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

case "${1:-}" in
  --dry-run)
    shift
    exec "$PYTHON" -m benchmarks.run --suite gpu --dry-run "$@"
    ;;
  --smoke)
    shift
    device=cpu
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && device=gpu
    exec "$PYTHON" -m benchmarks.run --suite gpu --smoke --device "$device" --out "${SMOKE_OUT:-benchmarks/results/tmp/gpu-smoke}" "$@"
    ;;
esac

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: no NVIDIA GPU visible (nvidia-smi); use 'python -m benchmarks.run --quick' on a CPU" >&2
  exit 2
fi
"$PYTHON" - <<'EOF'
import sys
import jax, torch
problems = []
if jax.default_backend() != "gpu":
    problems.append(f"jax runs on {jax.default_backend()}: install its CUDA plugin (e.g. pip install 'jax[cuda12]')")
if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} sees no CUDA device: install a CUDA build of torch")
if problems:
    sys.exit("error: " + "; ".join(problems))
print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on {torch.cuda.get_device_name()}")
EOF

# 500 s of rows (the budget, data decoding included) + slack for a row that runs long; at
# 570 s the run is interrupted and writes what it has measured (marked "interrupted").
exec timeout --signal=INT --kill-after=15 570 "$PYTHON" -m benchmarks.run --suite gpu --budget-seconds 500 --timeout 300 "$@"
