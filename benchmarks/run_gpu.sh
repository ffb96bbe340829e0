#!/usr/bin/env bash
# Everything issue 5 needs a GPU for, in one call on the GPU machine (the device tool's `run`):
#   1. build megafast._C with the CUDA kernels (pip install --no-build-isolation -e ., sm_90a);
#   2. the gpu-marked tests (Triton kernels compiled for real, bf16 flash attention, the CUDA RoPE
#      and multi-tensor AdamW/Lion, the optimizer and the model wired to them);
#   3. benchmarks/bench_kernels.py (extra arguments are passed on to it).
# Results land in $OUT (the device tool's folder; ./gpu_results elsewhere): env.txt, build.log,
# pytest_gpu.log, bench_kernels.{log,json,md}. The benchmark gets the time left of a 10-minute call
# and writes its tables after each section, so a run cut short still reports what it measured.
# Liger-Kernel (the comparison) is not on the machine: carry its wheel in .whl/ (see docs) and
# it is installed from there; without it the Liger columns are simply absent.
#
#   device run:  bash benchmarks/run_gpu.sh            (carry [".whl"] when the wheel is there)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -c "import liger_kernel; print('liger_kernel importable')" 2>/dev/null || echo "liger_kernel not installed"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

echo "== [$SECONDS s] build megafast._C with CUDA (log: build.log)"
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -80 "$OUT/build.log"
  exit 1
fi
"$PY" -c "import megafast._C as C; assert C.has_cuda, 'built without CUDA'; print('megafast._C has_cuda:', C.has_cuda)" \
  2>&1 | tee -a "$OUT/build.log" || exit 1

echo "== [$SECONDS s] gpu tests"
"$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs tests/ 2>&1 | tee "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}

left=$((BUDGET_S - SECONDS))
echo "== [$SECONDS s] kernel benchmark (${left} s left)"
timeout --signal=INT "$left" "$PY" benchmarks/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_kernels.log"
bench_rc=${PIPESTATUS[0]}
echo "== [$SECONDS s] done: tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
