#!/usr/bin/env bash
# The GPU check for a machine with an NVIDIA GPU (CUDA driver and nvcc), run from a clone in ~10 minutes:
# q4f16_1 compiled for cuda, then for webgpu (megrez-mlc's WebGPU runtime on the GPU's Vulkan driver):
# greedy ids against the CPU exact path, then batch-1 and batch-8 speed on the full Megrez-3B shape
# (details in gpu_check.py). Exit status 1 if the greedy ids differ on either.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import megrez_mlc" 2>/dev/null || pip install -q -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
status=0
python benchmarks/gpu_check.py --target cuda || status=1
python benchmarks/gpu_check.py --target webgpu || status=1
exit $status
