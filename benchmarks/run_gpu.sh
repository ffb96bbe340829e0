#!/usr/bin/env bash
# The GPU measurements, each mode one call of at most 10 minutes on the GPU machine (the device
# tool's `run`). Both first build megafast._C with the CUDA kernels (pip install
# --no-build-isolation -e ., sm_90a; build.log), then:
#   kernels (default): the gpu-marked tests (Triton kernels compiled for real, bf16 flash attention,
#      the CUDA RoPE and multi-tensor AdamW/Lion, the model wired to them, the planner's activation
#      peak vs torch.cuda.max_memory_allocated) and benchmarks/bench_kernels.py;
#   train: benchmarks/bench_train.py, a ~1B Llama (seq 2048, bf16) trained by pretrain_gpt.py's code
#      next to plain PyTorch + transformers, and the planner's predicted step time and memory.
# Extra arguments go to the benchmark. Results land in $OUT (./gpu_results elsewhere): env.txt,
# build.log, pytest_gpu.log, bench_kernels.{log,json,md} or bench_train.{log,json,md}; the
# benchmarks write after each section, so a run cut short still reports what it measured. Record
# them here afterwards, e.g. python benchmarks/bench_train.py --from-json F --write-doc docs/benchmarks.md
# Liger-Kernel (the comparison) is not on the machine: carry its wheel in .whl/ (see docs) and
# it is installed from there; without it the Liger columns are simply absent.
#
#   device run:  bash benchmarks/run_gpu.sh            (carry [".whl"] when the wheel is there)
#                bash benchmarks/run_gpu.sh train
#                bash benchmarks/run_gpu.sh moe     (the MoE kernels' gpu tests + benchmarks/bench_moe.py)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=kernels
if [ "${1:-}" = train ] || [ "${1:-}" = kernels ] || [ "${1:-}" = moe ]; then MODE=$1; shift; fi
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

if [ "$MODE" = train ]; then
  left=$((BUDGET_S - SECONDS))
  echo "== [$SECONDS s] training benchmark (${left} s left)"
  timeout --signal=INT "$left" "$PY" benchmarks/bench_train.py --out "$OUT" "$@" 2>&1 \
    | tee "$OUT/bench_train.log"
  exit "${PIPESTATUS[0]}"
fi

if [ "$MODE" = moe ]; then
  echo "== [$SECONDS s] MoE gpu tests"
  "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs -k moe tests/test_kernels_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log"
  tests_rc=${PIPESTATUS[0]}
  left=$((BUDGET_S - SECONDS))
  echo "== [$SECONDS s] MoE benchmark (${left} s left)"
  timeout --signal=INT "$left" "$PY" benchmarks/bench_moe.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_moe.log"
  bench_rc=${PIPESTATUS[0]}
  exit $(( tests_rc != 0 || bench_rc != 0 ))
fi

echo "== [$SECONDS s] gpu tests"
"$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs tests/ 2>&1 | tee "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}

left=$((BUDGET_S - SECONDS))
echo "== [$SECONDS s] kernel benchmark (${left} s left)"
timeout --signal=INT "$left" "$PY" benchmarks/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_kernels.log"
bench_rc=${PIPESTATUS[0]}
echo "== [$SECONDS s] done: tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
