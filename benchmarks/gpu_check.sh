#!/usr/bin/env bash
# What this project runs when a machine with an NVIDIA GPU is lent to it (README, Tests): the
# gpu-marked tests and the GPU benchmark, their output under $OUT. Packages that machine lacks
# travel as wheels in .whl/ (the README says which).
set -u
OUT=${OUT:-/tmp/r1-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
{
  date -u; nvidia-smi
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|onnxruntime|transformers|peft|tensorrt|nvidia-modelopt) '
  python3 -c "import transformers, peft, modelopt; print('path', transformers.__version__, peft.__version__, modelopt.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# The gpu-marked tests need only pipelines (no Django): conftest files above tests/pipelines
# are not loaded.
timeout "${R1_GPU_TEST_S:-300}" python3 -m pytest -m gpu tests/pipelines --confcutdir=tests/pipelines \
  -p no:django -p no:cacheprovider -o addopts= -v -rs 2>&1 | tee "$OUT/gpu_tests.txt"
timeout "${R1_GPU_BENCH_S:-180}" python3 benchmarks/bench_gpu.py 2>&1 | tee "$OUT/bench_gpu.txt"
